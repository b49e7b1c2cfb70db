"""Client address resolution behind trusted proxies."""

from __future__ import annotations

import ipaddress

import pytest

from receiver.netaddr import AddressPolicy, parse_address


def nets(*items: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(i) for i in items]


class TestAddressPolicy:
    policy = AddressPolicy(nets("52.1.251.34/32", "2001:db8::/32"), nets("10.0.0.0/8", "fd00::/8"))

    @pytest.mark.parametrize(
        ("peer", "xff", "client"),
        [
            ("52.1.251.34", [], "52.1.251.34"),
            ("198.51.100.1", ["52.1.251.34"], "198.51.100.1"),  # untrusted peer: header ignored
            ("10.1.2.3", ["52.1.251.34"], "52.1.251.34"),
            ("10.1.2.3", ["52.1.251.34, 10.9.9.9"], "52.1.251.34"),  # proxies on the right are skipped
            ("10.1.2.3", ["52.1.251.34, 198.51.100.7"], "198.51.100.7"),  # spoofed left-most entry not believed
            ("10.1.2.3", ["52.1.251.34", "198.51.100.7"], "198.51.100.7"),  # several headers are one list
            ("10.1.2.3", ["10.4.4.4"], "10.4.4.4"),  # only proxies: the left-most proxy
            ("fd00::1", ["2001:db8::5"], "2001:db8::5"),
            ("::ffff:10.0.0.1", ["[2001:db8::7]:443"], "2001:db8::7"),
            ("10.1.2.3", ["52.1.251.34, garbage"], None),
        ],
    )
    def test_client_address(self, peer: str, xff: list[str], client: str | None) -> None:
        resolved = self.policy.client_address(peer, xff)
        assert (str(resolved) if resolved else None) == client

    def test_allows(self) -> None:
        assert self.policy.allows(parse_address("52.1.251.34"))
        assert self.policy.allows(parse_address("2001:db8::1"))
        assert not self.policy.allows(parse_address("52.1.251.35"))
        assert not self.policy.allows(None)

    def test_check_gives_the_same_verdicts_when_remembered(self) -> None:
        cases = [("10.1.2.3", ["52.1.251.34"]), ("198.51.100.1", []), ("10.1.2.3", ["52.1.251.34, 198.51.100.7"])]
        for _ in range(2):
            for peer, xff in cases:
                client = self.policy.client_address(peer, xff)
                assert self.policy.check(peer, xff) == (client, self.policy.allows(client))
