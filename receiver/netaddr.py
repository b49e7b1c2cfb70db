"""Who is asking: the client address behind trusted proxies, and whether it is allow-listed."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_address(text: str) -> Address | None:
    """An IP address from a peer name or a header entry (`[::1]:443`, `1.2.3.4:80`, zone ids dropped)."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else text[1:]
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.split(":", 1)[0]
    text = text.split("%", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _within(address: Address, networks: Iterable[Network]) -> bool:
    return any(address.version == net.version and address in net for net in networks)


class AddressPolicy:
    """Resolves the client address (X-Forwarded-For believed only from trusted proxies) and checks it."""

    def __init__(self, allowed: Sequence[Network], trusted_proxies: Sequence[Network]) -> None:
        self._allowed = tuple(allowed)
        self._proxies = tuple(trusted_proxies)
        self._verdicts: dict[tuple[str | None, tuple[str, ...]], tuple[Address | None, bool]] = {}

    def check(self, peer: str | None, forwarded_for: Sequence[str]) -> tuple[Address | None, bool]:
        """The client address and whether it is allowed, remembered for the few peers a stream sees."""
        key = (peer, tuple(forwarded_for))
        verdict = self._verdicts.get(key)
        if verdict is None:
            client = self.client_address(peer, forwarded_for)
            verdict = (client, self.allows(client))
            if len(self._verdicts) >= 1024:  # many distinct peers or headers: start over rather than grow
                self._verdicts.clear()
            self._verdicts[key] = verdict
        return verdict

    def client_address(self, peer: str | None, forwarded_for: Sequence[str]) -> Address | None:
        """The TCP peer, or, when the peer is a trusted proxy, the right-most X-Forwarded-For entry that is
        not a trusted proxy. A left-most (client-supplied) entry is never believed past an untrusted hop."""
        address = parse_address(peer) if peer else None
        if address is None or not _within(address, self._proxies):
            return address
        hops = [hop for header in forwarded_for for hop in header.split(",")]
        for hop in reversed(hops):
            candidate = parse_address(hop)
            if candidate is None:
                return None  # a garbled hop: nothing to its left can be trusted
            if not _within(candidate, self._proxies):
                return candidate
            address = candidate
        return address

    def allows(self, address: Address | None) -> bool:
        """Whether the address is on the allowlist."""
        return address is not None and _within(address, self._allowed)
