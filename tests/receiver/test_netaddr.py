"""Client address resolution behind trusted proxies."""

from __future__ import annotations

import ipaddress
import tracemalloc

import pytest

from receiver.netaddr import MAX_FORWARDED_HOPS, AddressPolicy, parse_address


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

    def test_hops_beyond_the_limit_are_not_believed(self) -> None:
        proxies = ", ".join(f"10.0.0.{n}" for n in range(MAX_FORWARDED_HOPS - 1))
        assert str(self.policy.client_address("10.1.2.3", [f"52.1.251.34, {proxies}"])) == "52.1.251.34"
        too_many = f"52.1.251.34, {proxies}, 10.9.9.9"
        assert self.policy.check("10.1.2.3", [too_many]) == (None, False)
        assert self.policy.check("10.1.2.3", ["52.1.251.34", *proxies.split(", "), "10.9.9.9"]) == (None, False)

    def test_unique_huge_headers_are_not_remembered(self) -> None:
        policy = AddressPolicy(nets("52.1.251.34/32"), nets("10.0.0.0/8"))
        filler = ", ".join(["198.51.100.7"] * 600)
        tracemalloc.start()
        try:
            for number in range(300):
                headers = [f"{number}.{index}.{filler}" for index in range(20)]
                for peer in ("198.51.100.1", "10.1.2.3"):
                    assert policy.check(peer, headers)[1] is False
                del headers
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert held < 512 * 1024, f"{held} bytes still held after 600 checks of 160 KB of headers"
