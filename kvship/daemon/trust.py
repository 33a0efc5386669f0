"""Who this daemon trusts: the pre-shared keys of its peers, TLS contexts for peer links,
and the rule that an unprotected daemon stays on loopback (docs/security.md).

Secrets are read from files named in the config (never flags, never logged); a key file
that others may read is refused, as ssh refuses a private key others may read.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..addresses import split_hostport
from ..protocol.auth import KEY_ID, MIN_SECRET, PeerKey


class TrustError(ValueError):
    """A key file, token file or TLS file that cannot be used: the message names the file
    and what is wrong with it, never a secret."""


def _private_text(path: str, what: str) -> str:
    """The file's text, refused if group or others may read or write it."""
    try:
        mode = os.stat(path).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise TrustError(
                f"{what} {path} is mode {stat.S_IMODE(mode):04o}: others may read it "
                f"(chmod 600 {path})"
            )
        return Path(path).read_text()
    except OSError as exc:
        raise TrustError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise TrustError(f"{what} {path} is not UTF-8 text") from None


@dataclass(frozen=True)
class KeyFile:
    """The keys of an ``auth_key_file``::

    [keys]                       # id = hex secret (>= 16 bytes; kvship keygen makes 32)
    prefill-east = "9f0c..."
    decode-west = "41aa..."
    [peers]                      # optional: the key to prove towards one peer
    "decode-w2:7470" = "decode-west"
    """

    path: str
    keys: dict[str, bytes] = field(repr=False)
    peers: dict[str, str]

    @classmethod
    def load(cls, path: str) -> KeyFile:
        try:
            data = tomllib.loads(_private_text(path, "auth_key_file"))
        except tomllib.TOMLDecodeError as exc:
            raise TrustError(f"auth_key_file {path}: not TOML: {exc}") from None
        unknown = set(data) - {"keys", "peers"}
        if unknown:
            raise TrustError(f"auth_key_file {path}: unknown table(s) {sorted(unknown)}")
        table = data.get("keys")
        if not isinstance(table, dict) or not table:
            raise TrustError(f"auth_key_file {path}: needs a [keys] table with one key or more")
        keys = {}
        for key_id, value in table.items():
            if not KEY_ID.fullmatch(key_id):
                raise TrustError(
                    f"auth_key_file {path}: key id {key_id!r}: 1-64 of A-Z a-z 0-9 . _ -"
                )
            try:
                secret = bytes.fromhex(value) if isinstance(value, str) else b""
            except ValueError:
                secret = b""
            if len(secret) < MIN_SECRET:
                raise TrustError(
                    f"auth_key_file {path}: key {key_id!r} must be hex of at least "
                    f"{MIN_SECRET} bytes (kvship keygen makes one)"
                )
            keys[key_id] = secret
        peers = data.get("peers", {})
        if not isinstance(peers, dict):
            raise TrustError(f"auth_key_file {path}: [peers] must map host:port to a key id")
        for peer, key_id in peers.items():
            if key_id not in keys:
                raise TrustError(f"auth_key_file {path}: [peers] {peer!r} names no key {key_id!r}")
            try:
                split_hostport(peer)
            except ValueError:
                raise TrustError(
                    f"auth_key_file {path}: [peers] {peer!r} is not host:port"
                ) from None
        return cls(path, keys, dict(peers))

    def own(self, key_id: str) -> str:
        """The key this daemon proves by default: ``key_id``, or the file's only key."""
        if key_id:
            if key_id not in self.keys:
                raise TrustError(f"auth_key_id {key_id!r} is not in {self.path}")
            return key_id
        if len(self.keys) != 1:
            raise TrustError(
                f"{self.path} holds {len(self.keys)} keys: set auth_key_id to the one this "
                "daemon proves when it connects to peers"
            )
        return next(iter(self.keys))

    def accepted(self, allow: list[str]) -> dict[str, bytes]:
        """The keys a peer may prove to connect and send here (``allow_senders``)."""
        missing = [k for k in allow if k not in self.keys]
        if missing:
            raise TrustError(f"allow_senders names keys not in {self.path}: {missing}")
        return {k: s for k, s in self.keys.items() if not allow or k in allow}


@dataclass(frozen=True)
class PeerKeys:
    """Which key to prove towards which peer."""

    keys: KeyFile
    default: str

    def for_peer(self, address: str) -> PeerKey:
        key_id = self.keys.peers.get(address, self.default)
        return PeerKey(key_id, self.keys.keys[key_id])


def read_token(path: str) -> str:
    token = _private_text(path, "control_token_file").strip()
    if len(token) < 16:
        raise TrustError(f"control_token_file {path}: the token must be 16 characters or more")
    return token


@dataclass
class TlsContexts:
    """TLS 1.3, mutual, on peer links: the listener's context and the one links connect
    with. :meth:`reload` loads the files again into the same contexts (SIGHUP): new
    connections use the new certificate, live ones keep theirs."""

    cert: str
    key: str
    ca: str
    server: ssl.SSLContext = field(init=False, repr=False)
    client: ssl.SSLContext = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies name and chain
        for ctx in (self.server, self.client):
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.verify_mode = ssl.CERT_REQUIRED  # the server asks for the client's too
        self.reload()

    def reload(self, cert: str = "", key: str = "", ca: str = "") -> None:
        """Load cert, key and CA (these files, or the same ones again) into both contexts;
        raises TrustError naming the file, having changed nothing (the files are tried on
        a scratch context first)."""
        cert, key, ca = cert or self.cert, key or self.key, ca or self.ca
        for ctx in (ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), self.server, self.client):
            try:
                ctx.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as exc:
                raise TrustError(f"tls_cert {cert} / tls_key {key}: {exc}") from None
            try:
                ctx.load_verify_locations(cafile=ca)  # adds: a removed CA needs a restart
            except (OSError, ssl.SSLError) as exc:
                raise TrustError(f"tls_ca {ca}: {exc}") from None
        self.cert, self.key, self.ca = cert, key, ca


def is_loopback(host: str) -> bool:
    """Literal loopback addresses and ``localhost``; anything else may face a network."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposed(address: str) -> bool:
    """True if a listener on ``address`` is reachable from other hosts."""
    return bool(address) and not is_loopback(split_hostport(address)[0])
