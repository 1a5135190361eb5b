"""The encrypted keystore: one JSON file holding the wallet's secrets.

Envelope (version 1), all fields but `ciphertext` authenticated as AEAD associated data:

    {"format": "escrowd-keystore", "version": 1,
     "kdf": "scrypt", "kdf_params": {"n": 32768, "r": 8, "p": 1, "salt": "<base64>"},
     "cipher": "aes-256-gcm", "nonce": "<base64>",
     "evm_account_xpub": "xpub...", "ciphertext": "<base64>"}

The plaintext is JSON with the BIP-39 entropy, the optional BIP-39 passphrase and the
hot-wallet keys used for payouts. Hot-wallet keys are derived from the seed on paths no
deposit address uses (see wallets.hd): EVM payouts m/44'/60'/1'/0/0, EVM gas
m/44'/60'/2'/0/0, Solana payouts m/44'/501'/2147483647'/0'. They are stored, not only
re-derived, so a later version can hold imported keys in the same slots.

The account xpub sits in the header in clear so its authenticity is checked on unlock and
a watch-only host can be given it; it is public.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog
from coincurve import PrivateKey
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from solders.keypair import Keypair

from escrowd.wallets.errors import (
    KeystoreCorrupt,
    KeystoreExists,
    KeystoreNotFound,
    KeystorePermissions,
    PassphraseUnavailable,
    WrongPassphrase,
)
from escrowd.wallets.hd import (
    EVM_ACCOUNT_PATH,
    EVM_GAS_WALLET_PATH,
    EVM_HOT_WALLET_PATH,
    HARDENED,
    SOLANA_HOT_WALLET_INDEX,
    EvmXpubDeriver,
    ExtendedPrivateKey,
    SolanaSeedDeriver,
    evm_address_of_private_key,
)
from escrowd.wallets.mnemonic import (
    entropy_to_mnemonic,
    generate_mnemonic,
    mnemonic_to_entropy,
    mnemonic_to_seed,
)
from escrowd.wallets.secrets import Secret

log = structlog.get_logger(__name__)

FORMAT: Final = "escrowd-keystore"
VERSION: Final = 1
DEFAULT_SCRYPT_LOG2_N: Final = 15
# Bounds on what a keystore file may ask of us: a hostile file must not make unlock eat
# gigabytes (n * r * 128 bytes) or hours.
_MAX_SCRYPT_LOG2_N: Final = 22
_MAX_SCRYPT_R: Final = 32
_MAX_SCRYPT_P: Final = 16
_MAX_FILE_BYTES: Final = 64 * 1024
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1

DEFAULT_PASSPHRASE_ENV: Final = "ESCROWD_KEYSTORE_PASSPHRASE"
DEFAULT_CREDENTIAL_NAME: Final = "keystore-passphrase"


@dataclass(frozen=True, slots=True, repr=False)
class EvmKey:
    """An EVM signing key and its address. Repr shows the address only."""

    path: str
    address: str
    private_key: Secret[bytes]

    def __repr__(self) -> str:
        return f"EvmKey(path={self.path!r}, address={self.address!r}, private_key=<redacted>)"


@dataclass(frozen=True, slots=True, repr=False)
class SolanaKey:
    """A Solana keypair and its address. Repr shows the address only."""

    path: str
    address: str
    keypair_bytes: Secret[bytes]  # 64 bytes: ed25519 secret seed + public key

    def keypair(self) -> Keypair:
        return Keypair.from_bytes(self.keypair_bytes.reveal())

    def __repr__(self) -> str:
        return f"SolanaKey(path={self.path!r}, address={self.address!r}, keypair=<redacted>)"


def _solana_path(index: int) -> str:
    return f"m/44'/501'/{index}'/0'"


class UnlockedKeystore:
    """The decrypted keystore. Holds secrets; its repr shows only public facts."""

    __slots__ = (
        "_entropy",
        "_evm_external",
        "_passphrase",
        "_seed",
        "_solana",
        "evm_account_xpub",
        "evm_gas_wallet",
        "evm_hot_wallet",
        "path",
        "solana_hot_wallet",
    )

    def __init__(
        self,
        *,
        path: Path,
        entropy: Secret[bytes],
        bip39_passphrase: Secret[str],
        evm_hot_wallet: EvmKey,
        evm_gas_wallet: EvmKey,
        solana_hot_wallet: SolanaKey,
    ) -> None:
        self.path = path
        self._entropy = entropy
        self._passphrase = bip39_passphrase
        seed = mnemonic_to_seed(entropy_to_mnemonic(entropy.reveal()), bip39_passphrase)
        master = ExtendedPrivateKey.from_seed(seed)
        account = master.derive(EVM_ACCOUNT_PATH)
        self.evm_account_xpub = account.public().serialize()
        self._evm_external = account.child(0)
        self._seed = seed
        self._solana = SolanaSeedDeriver(seed)
        self.evm_hot_wallet = evm_hot_wallet
        self.evm_gas_wallet = evm_gas_wallet
        self.solana_hot_wallet = solana_hot_wallet

    def __repr__(self) -> str:
        return (
            f"UnlockedKeystore(path={str(self.path)!r}, evm_account_xpub={self.evm_account_xpub!r})"
        )

    def evm_deriver(self) -> EvmXpubDeriver:
        """Watch-only deriver for deposit addresses (needs only the xpub)."""
        return EvmXpubDeriver(self.evm_account_xpub)

    def solana_deriver(self, usdc_mint: str | None = None) -> SolanaSeedDeriver:
        """Deposit-address deriver for Solana; with a mint it also gives the USDC ATA."""
        return SolanaSeedDeriver(self._seed, usdc_mint)

    def derive_evm(self, index: int) -> EvmKey:
        """Deposit key m/44'/60'/0'/0/index (address and signing key)."""
        if not 0 <= index < HARDENED:
            raise ValueError("EVM deposit index must be in 0..2**31-1")
        key = self._evm_external.child(index).private_key
        return EvmKey(f"{EVM_ACCOUNT_PATH}/0/{index}", evm_address_of_private_key(key), key)

    def derive_solana(self, index: int) -> SolanaKey:
        """Deposit key m/44'/501'/index'/0' (address and keypair)."""
        keypair = self._solana.keypair(index)
        return SolanaKey(_solana_path(index), str(keypair.pubkey()), Secret(bytes(keypair)))

    def mnemonic(self) -> Secret[str]:
        """The backup phrase. Only `escrowd keys init` shows it, once."""
        return entropy_to_mnemonic(self._entropy.reveal())


def _hot_wallets(
    entropy: Secret[bytes], bip39_passphrase: Secret[str]
) -> tuple[EvmKey, EvmKey, SolanaKey]:
    seed = mnemonic_to_seed(entropy_to_mnemonic(entropy.reveal()), bip39_passphrase)
    master = ExtendedPrivateKey.from_seed(seed)
    keys = []
    for path in (EVM_HOT_WALLET_PATH, EVM_GAS_WALLET_PATH):
        private_key = master.derive(path).private_key
        keys.append(EvmKey(path, evm_address_of_private_key(private_key), private_key))
    keypair = SolanaSeedDeriver(seed).keypair(SOLANA_HOT_WALLET_INDEX)
    solana = SolanaKey(
        _solana_path(SOLANA_HOT_WALLET_INDEX), str(keypair.pubkey()), Secret(bytes(keypair))
    )
    return keys[0], keys[1], solana


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: Any, field: str) -> bytes:
    if not isinstance(value, str):
        raise KeystoreCorrupt(f"keystore field {field!r} is missing or not a string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise KeystoreCorrupt(f"keystore field {field!r} is not valid base64") from None


def _associated_data(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def _kdf_key(passphrase: Secret[str], salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=2**log2_n, r=r, p=p).derive(passphrase.reveal().encode())


def _encrypt(
    payload: dict[str, Any], passphrase: Secret[str], evm_account_xpub: str, log2_n: int
) -> bytes:
    salt = os.urandom(16)
    nonce = os.urandom(12)
    header: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "kdf": "scrypt",
        "kdf_params": {"n": 2**log2_n, "r": SCRYPT_R, "p": SCRYPT_P, "salt": _b64(salt)},
        "cipher": "aes-256-gcm",
        "nonce": _b64(nonce),
        "evm_account_xpub": evm_account_xpub,
    }
    key = _kdf_key(passphrase, salt, log2_n, SCRYPT_R, SCRYPT_P)
    plaintext = json.dumps(payload).encode()
    ciphertext = AESGCM(key).encrypt(nonce, plaintext, _associated_data(header))
    return (json.dumps({**header, "ciphertext": _b64(ciphertext)}, indent=2) + "\n").encode()


def _write_new_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 0600, atomically, never replacing an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            # link() fails if the target exists, unlike rename(): a concurrent init cannot
            # clobber a keystore that appeared after our existence check.
            os.link(temp, path)
        except FileExistsError:
            raise KeystoreExists(
                f"keystore {path} already exists; refusing to overwrite it"
            ) from None
    finally:
        temp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def create_keystore(
    path: Path,
    passphrase: Secret[str],
    *,
    mnemonic: Secret[str] | None = None,
    bip39_passphrase: Secret[str] | None = None,
    scrypt_log2_n: int = DEFAULT_SCRYPT_LOG2_N,
) -> UnlockedKeystore:
    """Create a keystore at `path` (new mnemonic unless one is given to restore).

    Raises KeystoreExists if the file exists. The returned object's `mnemonic()` is the
    backup phrase; the caller shows it once.
    """
    if not 1 <= scrypt_log2_n <= _MAX_SCRYPT_LOG2_N:
        raise ValueError(f"scrypt_log2_n must be in 1..{_MAX_SCRYPT_LOG2_N}")
    if not passphrase.reveal():
        raise PassphraseUnavailable("the keystore passphrase must not be empty")
    if path.exists():
        raise KeystoreExists(f"keystore {path} already exists; refusing to overwrite it")
    phrase = mnemonic if mnemonic is not None else generate_mnemonic()
    entropy = mnemonic_to_entropy(phrase)
    extra = bip39_passphrase if bip39_passphrase is not None else Secret("")
    evm_hot, evm_gas, solana_hot = _hot_wallets(entropy, extra)
    unlocked = UnlockedKeystore(
        path=path,
        entropy=entropy,
        bip39_passphrase=extra,
        evm_hot_wallet=evm_hot,
        evm_gas_wallet=evm_gas,
        solana_hot_wallet=solana_hot,
    )
    payload = {
        "entropy": entropy.reveal().hex(),
        "bip39_passphrase": extra.reveal(),
        "hot_wallets": {
            "evm_payout": {"path": evm_hot.path, "private_key": evm_hot.private_key.reveal().hex()},
            "evm_gas": {"path": evm_gas.path, "private_key": evm_gas.private_key.reveal().hex()},
            "solana_payout": {
                "path": solana_hot.path,
                "keypair": solana_hot.keypair_bytes.reveal().hex(),
            },
        },
    }
    _write_new_file(path, _encrypt(payload, passphrase, unlocked.evm_account_xpub, scrypt_log2_n))
    log.info("keystore_created", path=str(path), scrypt_log2_n=scrypt_log2_n)
    return unlocked


def _read_envelope(path: Path) -> dict[str, Any]:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeystoreNotFound(
            f"keystore {path} does not exist; create it with `escrowd keys init` "
            "or set keystore.path"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise KeystoreCorrupt(f"keystore {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise KeystorePermissions(
            f"keystore {path} has mode {mode:04o}, open to other users; "
            f"run `chmod 600 {path}` and check who could have read it"
        )
    if st.st_size > _MAX_FILE_BYTES:
        raise KeystoreCorrupt(f"keystore {path} is {st.st_size} bytes, too large to be one")
    try:
        envelope = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise KeystoreCorrupt(
            f"keystore {path} is not valid JSON (truncated or corrupted); restore it from "
            "backup or recreate it from the mnemonic"
        ) from None
    if not isinstance(envelope, dict):
        raise KeystoreCorrupt(f"keystore {path} is not a JSON object")
    if envelope.get("format") != FORMAT or envelope.get("version") != VERSION:
        raise KeystoreCorrupt(f"keystore {path} is not an {FORMAT} version {VERSION} file")
    if envelope.get("kdf") != "scrypt" or envelope.get("cipher") != "aes-256-gcm":
        raise KeystoreCorrupt(f"keystore {path} names an unsupported kdf or cipher")
    return envelope


def _kdf_params(envelope: dict[str, Any], path: Path) -> tuple[bytes, int, int, int]:
    params = envelope.get("kdf_params")
    if not isinstance(params, dict):
        raise KeystoreCorrupt(f"keystore {path} has no kdf_params")
    n, r, p = params.get("n"), params.get("r"), params.get("p")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, r, p)):
        raise KeystoreCorrupt(f"keystore {path} has non-integer scrypt parameters")
    assert isinstance(n, int) and isinstance(r, int) and isinstance(p, int)
    log2_n = n.bit_length() - 1
    if n < 2 or n != 2**log2_n or log2_n > _MAX_SCRYPT_LOG2_N:
        raise KeystoreCorrupt(f"keystore {path} has an invalid scrypt n")
    if not (1 <= r <= _MAX_SCRYPT_R and 1 <= p <= _MAX_SCRYPT_P):
        raise KeystoreCorrupt(f"keystore {path} has out-of-range scrypt r or p")
    salt = _unb64(params.get("salt"), "kdf_params.salt")
    if len(salt) < 16:
        raise KeystoreCorrupt(f"keystore {path} has a salt shorter than 16 bytes")
    return salt, log2_n, r, p


def read_account_xpub(path: Path) -> str:
    """The EVM account xpub from the header, without the passphrase (not authenticated:
    prefer `unlock_keystore(...).evm_account_xpub` when the passphrase is available)."""
    xpub = _read_envelope(path).get("evm_account_xpub")
    if not isinstance(xpub, str):
        raise KeystoreCorrupt(f"keystore {path} has no evm_account_xpub")
    return xpub


def unlock_keystore(path: Path, passphrase: Secret[str]) -> UnlockedKeystore:
    """Decrypt the keystore. Raises a KeystoreError subclass, having derived nothing."""
    envelope = _read_envelope(path)
    salt, log2_n, r, p = _kdf_params(envelope, path)
    nonce = _unb64(envelope.get("nonce"), "nonce")
    ciphertext = _unb64(envelope.get("ciphertext"), "ciphertext")
    if len(nonce) != 12:
        raise KeystoreCorrupt(f"keystore {path} has a nonce of the wrong length")
    header = {k: v for k, v in envelope.items() if k != "ciphertext"}
    key = _kdf_key(passphrase, salt, log2_n, r, p)
    try:
        plaintext = AESGCM(key).decrypt(nonce, ciphertext, _associated_data(header))
    except InvalidTag:
        log.warning("keystore_unlock_failed", path=str(path), reason="authentication")
        raise WrongPassphrase(
            f"cannot decrypt keystore {path}: wrong passphrase, or the file was modified"
        ) from None
    unlocked = _open_payload(path, plaintext)
    if unlocked.evm_account_xpub != envelope.get("evm_account_xpub"):
        raise KeystoreCorrupt(f"keystore {path}: header xpub does not match its seed")
    log.info("keystore_unlocked", path=str(path))
    return unlocked


def _open_payload(path: Path, plaintext: bytes) -> UnlockedKeystore:
    corrupt = KeystoreCorrupt(f"keystore {path} decrypted but its contents are malformed")
    try:
        payload = json.loads(plaintext)
        entropy = Secret(bytes.fromhex(payload["entropy"]))
        extra = Secret(str(payload["bip39_passphrase"]))
        wallets = payload["hot_wallets"]
        evm_keys = []
        for name in ("evm_payout", "evm_gas"):
            private_key = Secret(bytes.fromhex(wallets[name]["private_key"]))
            PrivateKey(private_key.reveal())
            address = evm_address_of_private_key(private_key)
            evm_keys.append(EvmKey(str(wallets[name]["path"]), address, private_key))
        keypair_bytes = Secret(bytes.fromhex(wallets["solana_payout"]["keypair"]))
        solana = SolanaKey(
            str(wallets["solana_payout"]["path"]),
            str(Keypair.from_bytes(keypair_bytes.reveal()).pubkey()),
            keypair_bytes,
        )
        return UnlockedKeystore(
            path=path,
            entropy=entropy,
            bip39_passphrase=extra,
            evm_hot_wallet=evm_keys[0],
            evm_gas_wallet=evm_keys[1],
            solana_hot_wallet=solana,
        )
    except (KeyError, TypeError, ValueError):
        raise corrupt from None


def load_passphrase(
    *,
    env_name: str = DEFAULT_PASSPHRASE_ENV,
    passphrase_file: Path | None = None,
    credential_name: str = DEFAULT_CREDENTIAL_NAME,
    environ: dict[str, str] | None = None,
) -> Secret[str]:
    """Find the keystore passphrase. Sources, first match wins:

    1. systemd credential: $CREDENTIALS_DIRECTORY/<credential_name> (LoadCredential= /
       LoadCredentialEncrypted= in the unit; never in the environment of other processes).
    2. `passphrase_file`, if configured (must be mode 0600 or stricter).
    3. The environment variable `env_name` (default ESCROWD_KEYSTORE_PASSPHRASE).

    One trailing newline is stripped from files. Raises PassphraseUnavailable naming the
    sources tried (never their contents).
    """
    env = os.environ if environ is None else environ
    tried = []
    credentials_dir = env.get("CREDENTIALS_DIRECTORY")
    if credentials_dir:
        credential = Path(credentials_dir) / credential_name
        tried.append(f"systemd credential {credential}")
        if credential.is_file():
            return _passphrase_from_file(credential, check_mode=False)
    else:
        tried.append("systemd credential (CREDENTIALS_DIRECTORY not set)")
    if passphrase_file is not None:
        tried.append(f"file {passphrase_file}")
        if passphrase_file.is_file():
            return _passphrase_from_file(passphrase_file, check_mode=True)
    value = env.get(env_name)
    tried.append(f"environment variable {env_name}")
    if value:
        return Secret(value)
    raise PassphraseUnavailable(
        "no keystore passphrase found; tried: "
        + "; ".join(tried)
        + ". Provide one of them (see keystore settings)."
    )


def _passphrase_from_file(path: Path, *, check_mode: bool) -> Secret[str]:
    if check_mode:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise KeystorePermissions(
                f"passphrase file {path} has mode {mode:04o}, open to other users; "
                f"run `chmod 600 {path}`"
            )
    text = path.read_text(encoding="utf-8")
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise PassphraseUnavailable(f"passphrase source {path} is empty")
    return Secret(text)
