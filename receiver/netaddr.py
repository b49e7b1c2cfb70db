"""Who is asking: the client address behind trusted proxies, and whether it is allow-listed."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Sequence

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


MAX_FORWARDED_HOPS = 16
"""X-Forwarded-For entries examined from the right; a chain of more trusted proxies than this is refused."""
_MAX_ADDRESS_TEXT = 100
"""Longer than any address with brackets, zone id and port: such an entry is garbage, not worth parsing."""
_MAX_REMEMBERED = 1024

_Verdict = tuple[Address | None, bool, bool]
"""An address text's address, whether it is a trusted proxy, whether it is allowed."""


class AddressPolicy:
    """Resolves the client address (X-Forwarded-For believed only from trusted proxies) and checks it."""

    # What a request costs here is bounded before its body is read: at most MAX_FORWARDED_HOPS entries are looked
    # at, and only short address texts are remembered, never whole headers.

    def __init__(self, allowed: Sequence[Network], trusted_proxies: Sequence[Network]) -> None:
        self._allowed = tuple(allowed)
        self._proxies = tuple(trusted_proxies)
        self._verdicts: dict[str, _Verdict] = {}

    def _verdict(self, text: str) -> _Verdict:
        verdict = self._verdicts.get(text)
        if verdict is None:
            if len(text) > _MAX_ADDRESS_TEXT:
                return (None, False, False)
            address = parse_address(text)
            if address is None:
                verdict = (None, False, False)
            else:
                verdict = (address, _within(address, self._proxies), _within(address, self._allowed))
            if len(self._verdicts) >= _MAX_REMEMBERED:  # many distinct addresses: start over rather than grow
                self._verdicts.clear()
            self._verdicts[text] = verdict
        return verdict

    def listed(self, peer: str) -> bool:
        """Whether a connection from `peer` may be served at all: it is allowed, or a trusted proxy."""
        _, proxy, allowed = self._verdict(peer)
        return proxy or allowed

    def check(self, peer: str | None, forwarded_for: Sequence[str]) -> tuple[Address | None, bool]:
        """The client address (see `client_address`) and whether it is allowed."""
        address, proxy, allowed = self._verdict(peer) if peer else (None, False, False)
        if not proxy:
            return address, allowed
        for hop in _hops_from_the_right(forwarded_for):
            candidate, proxy, allowed = self._verdict(hop.strip())
            if candidate is None:
                return None, False  # a garbled (or one too many) hop: nothing to its left can be trusted
            address = candidate
            if not proxy:
                break
        return address, allowed

    def client_address(self, peer: str | None, forwarded_for: Sequence[str]) -> Address | None:
        """The TCP peer, or, when the peer is a trusted proxy, the right-most X-Forwarded-For entry that is
        not a trusted proxy. A left-most (client-supplied) entry is never believed past an untrusted hop."""
        return self.check(peer, forwarded_for)[0]

    def allows(self, address: Address | None) -> bool:
        """Whether the address is on the allowlist."""
        return address is not None and _within(address, self._allowed)


def _hops_from_the_right(forwarded_for: Sequence[str]) -> Iterator[str]:
    """The X-Forwarded-For entries right to left, at most MAX_FORWARDED_HOPS, then an empty one if more follow."""
    left = MAX_FORWARDED_HOPS
    for header in reversed(forwarded_for):
        # With a limit, rsplit cuts only the header's tail; the rest stays one piece, past the limit anyway.
        for hop in reversed(header.rsplit(",", left)):
            if left == 0:
                yield ""
                return
            left -= 1
            yield hop
