//! The API key format, key digests and their constant-time comparison.
//!
//! A key looks like `lk_1f2e3d4c_Qx7...` (76 characters):
//!
//! ```text
//! lk_1f2e3d4c_<64 base62 characters>
//! └────┬────┘ └──────────┬─────────┘
//!   prefix          secret
//! ```
//!
//! The prefix (`lk_` and 8 random hex digits) is public: it goes into the configuration next to
//! the key's SHA-256, finds the entry to compare against, and is safe to show in listings. The
//! secret is 64 characters from 62 (about 381 bits) drawn from the operating system's random
//! source. The gateway stores only the SHA-256 of the whole key; a plain hash is enough because
//! the key has far too much entropy to guess, unlike a password.

use std::io::Read as _;

use sha2::{Digest as _, Sha256};

use crate::ApiKey;

/// What every generated key starts with.
pub const KEY_TAG: &str = "lk_";
/// Random hex digits after the tag: the rest of the public prefix.
const PREFIX_HEX_DIGITS: usize = 8;
/// Characters of the secret part.
const SECRET_LEN: usize = 64;
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Makes a new key for `id`: the key to hand to its owner (shown once, never stored) and the
/// entry for `[[gateway.auth.keys]]` (or the keys file).
pub fn generate_key(id: &str) -> (String, ApiKey) {
    let mut random = RandomSource::new();
    let tag: String = (0..PREFIX_HEX_DIGITS).map(|_| char::from(HEX[usize::from(random.below(16))])).collect();
    let secret: String = (0..SECRET_LEN).map(|_| char::from(ALPHABET[usize::from(random.below(62))])).collect();
    let prefix = format!("{KEY_TAG}{tag}");
    let key = format!("{prefix}_{secret}");
    let entry = ApiKey { id: id.to_owned(), prefix, sha256: sha256_hex(&key), ..ApiKey::default() };
    (key, entry)
}

/// The public prefix of a key in the `lk_<8 hex>_<secret>` format, or `None` for another shape.
pub fn prefix_of(key: &str) -> Option<&str> {
    let end = KEY_TAG.len() + PREFIX_HEX_DIGITS;
    let prefix = key.get(..end)?;
    let well_formed = prefix.starts_with(KEY_TAG)
        && prefix[KEY_TAG.len()..].bytes().all(|b| b.is_ascii_hexdigit())
        && key.as_bytes().get(end) == Some(&b'_')
        && key.len() > end + 1;
    well_formed.then_some(prefix)
}

/// The hex SHA-256 of a key, as the configuration stores it.
pub fn sha256_hex(key: &str) -> String {
    let digest = sha256(key);
    let mut hex = String::with_capacity(64);
    for byte in digest {
        hex.push(char::from(HEX[usize::from(byte >> 4)]));
        hex.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    hex
}

/// The SHA-256 of a presented key, to compare with an entry's digest ([`constant_time_eq`]).
pub fn sha256(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Parses 64 hex digits (either case) into a digest: an entry's `sha256`.
pub fn parse_sha256_hex(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut digest = [0u8; 32];
    for (byte, pair) in digest.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = (hex_value(pair[0])? << 4) | hex_value(pair[1])?;
    }
    Some(digest)
}

/// Equality whose running time depends only on the lengths, not on where the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the optimizer from turning the fold back into an early-exit comparison.
    std::hint::black_box(difference) == 0
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// Random bytes from the operating system (`/dev/urandom`), unbiased below a bound. `fastrand`
/// only stands in where there is no `/dev/urandom`: its 64-bit state cannot give a key more than
/// 64 bits of entropy, so it is not good enough for keys on its own.
struct RandomSource {
    urandom: Option<std::fs::File>,
    buffer: [u8; 64],
    used: usize,
}

impl RandomSource {
    fn new() -> Self {
        let urandom = std::fs::File::open("/dev/urandom").ok();
        if urandom.is_none() {
            tracing::warn!("no /dev/urandom; generating the key with a weaker random source");
        }
        Self { urandom, buffer: [0; 64], used: 64 }
    }

    fn byte(&mut self) -> u8 {
        if self.used == self.buffer.len() {
            let filled = self.urandom.as_mut().is_some_and(|file| file.read_exact(&mut self.buffer).is_ok());
            if !filled {
                fastrand::fill(&mut self.buffer);
            }
            self.used = 0;
        }
        self.used += 1;
        self.buffer[self.used - 1]
    }

    /// Uniform in `0..bound` (bound <= 256), by rejection: no modulo bias.
    fn below(&mut self, bound: u16) -> u8 {
        let limit = 256 - 256 % bound;
        loop {
            let byte = self.byte();
            if u16::from(byte) < limit {
                return (u16::from(byte) % bound) as u8;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let (key, entry) = generate_key("team-a");
        assert_eq!(key.len(), KEY_TAG.len() + PREFIX_HEX_DIGITS + 1 + SECRET_LEN);
        assert_eq!(prefix_of(&key), Some(entry.prefix.as_str()));
        assert!(key.starts_with(&entry.prefix));
        assert_eq!(entry.id, "team-a");
        assert_eq!(entry.sha256, sha256_hex(&key));
        assert_eq!(entry.sha256.len(), 64);
        let secret = &key[entry.prefix.len() + 1..];
        assert!(secret.bytes().all(|b| b.is_ascii_alphanumeric()), "{secret}");
        // Two keys never collide (381 bits of secret).
        let (other, _) = generate_key("team-a");
        assert_ne!(key, other);
    }

    #[test]
    fn prefixes_are_parsed_only_from_well_formed_keys() {
        assert_eq!(prefix_of("lk_0123abcd_secret"), Some("lk_0123abcd"));
        assert_eq!(prefix_of("lk_0123ABCD_s"), Some("lk_0123ABCD"));
        assert_eq!(prefix_of("lk_0123abcd_"), None, "no secret");
        assert_eq!(prefix_of("lk_0123abcd"), None);
        assert_eq!(prefix_of("lk_0123abcg_secret"), None, "not hex");
        assert_eq!(prefix_of("xx_0123abcd_secret"), None);
        assert_eq!(prefix_of("lk_0123abcdXsecret"), None);
        assert_eq!(prefix_of(""), None);
        assert_eq!(prefix_of("lk_é123abcd_secret"), None);
    }

    #[test]
    fn digests_round_trip_through_hex() {
        let hex = sha256_hex("abc");
        // FIPS 180-2 test vector.
        assert_eq!(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(parse_sha256_hex(&hex), Some(sha256("abc")));
        assert_eq!(parse_sha256_hex(&hex.to_uppercase()), Some(sha256("abc")));
        assert_eq!(parse_sha256_hex(&hex[..62]), None);
        assert_eq!(parse_sha256_hex(&format!("{}zz", &hex[..62])), None);
    }

    #[test]
    fn constant_time_eq_compares_whole_slices() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"same bytes", b"same bytes"));
        assert!(!constant_time_eq(b"same bytes", b"same bytez"));
        assert!(!constant_time_eq(b"xame bytes", b"same bytes"));
        assert!(!constant_time_eq(b"short", b"shorter"));
        let a = sha256("one");
        let b = sha256("two");
        assert!(constant_time_eq(&a, &a));
        assert!(!constant_time_eq(&a, &b));
    }

    #[test]
    fn random_bytes_are_unbiased_below_the_bound() {
        let mut random = RandomSource::new();
        let mut counts = [0u32; 62];
        for _ in 0..62_000 {
            counts[usize::from(random.below(62))] += 1;
        }
        // Each bucket expects 1000; 6 standard deviations is about 190.
        assert!(counts.iter().all(|&c| (800..1200).contains(&c)), "{counts:?}");
    }
}
