//! Callback signatures, pure: `Edgecache-Signature: t=<unix seconds>,v1=<hex>` where `<hex>`
//! is HMAC-SHA256 keyed with `CALLBACK_SECRET` over `"<t>.<body>"` — the scheme Stripe's
//! webhooks use, so receivers can reuse what they know. The timestamp is signed with the body:
//! a receiver that also refuses timestamps older than a few minutes cannot be fed a replayed
//! delivery later. Every attempt of a delivery is signed afresh with its own `t`.
//!
//! [`verify`] is what a receiver does (the README shows it in Python and openssl); it is here
//! for the tests and for anyone writing a receiver in Rust against this crate.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The signature header's name.
pub const SIGNATURE_HEADER: &str = "edgecache-signature";

type HmacSha256 = Hmac<Sha256>;

/// HMAC-SHA256 of the concatenation of `parts` under `key` (RFC 2104; any key length).
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = keyed(key);
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn keyed(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length (long ones are hashed first): this cannot fail.
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts any key length")
}

/// The MAC of one delivery: HMAC-SHA256(`secret`, `"<t>.<body>"`).
pub fn sign(secret: &[u8], t: u64, body: &[u8]) -> [u8; 32] {
    hmac_sha256(secret, &[t.to_string().as_bytes(), b".", body])
}

/// The `Edgecache-Signature` value for `body` sent at `t` (Unix seconds).
pub fn signature_header(secret: &[u8], t: u64, body: &[u8]) -> String {
    format!("t={t},v1={}", to_hex(&sign(secret, t, body)))
}

/// Why [`verify`] refused a signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyError {
    /// Not `t=<digits>,v1=<64 hex digits>[,v1=…]`.
    Malformed,
    /// `t` is further than the tolerance from the receiver's clock (a replay, or a clock off).
    Stale,
    /// No `v1` matches the body under this secret.
    Mismatch,
}

/// Checks an `Edgecache-Signature` `header` for `body` as a receiver would: `t` within
/// `tolerance_secs` of `now` (Unix seconds) and one of the `v1` values equal, in constant
/// time, to the HMAC of `"<t>.<body>"`. Several `v1` entries are accepted, so a sender may
/// sign with an old and a new secret while a rotation is under way.
pub fn verify(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now: u64,
    tolerance_secs: u64,
) -> Result<(), VerifyError> {
    let mut t = None;
    let mut macs = Vec::new();
    for item in header.split(',') {
        match item.trim().split_once('=') {
            Some(("t", v))
                if t.is_none() && !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) =>
            {
                t = Some(v.parse::<u64>().map_err(|_| VerifyError::Malformed)?)
            }
            Some(("v1", v)) => macs.push(from_hex::<32>(v).ok_or(VerifyError::Malformed)?),
            // Other schemes may come later; an unknown key is skipped, as Stripe's are.
            Some((k, _)) if k != "t" => {}
            _ => return Err(VerifyError::Malformed),
        }
    }
    let t = t.ok_or(VerifyError::Malformed)?;
    if macs.is_empty() {
        return Err(VerifyError::Malformed);
    }
    if now.abs_diff(t) > tolerance_secs {
        return Err(VerifyError::Stale);
    }
    let matches = |mac: &[u8; 32]| {
        let mut m = keyed(secret);
        m.update(t.to_string().as_bytes());
        m.update(b".");
        m.update(body);
        // `verify_slice` compares in constant time.
        m.verify_slice(mac).is_ok()
    };
    // Check every candidate, so the time taken does not tell which one matched.
    let hits = macs.iter().filter(|mac| matches(mac)).count();
    if hits > 0 {
        Ok(())
    } else {
        Err(VerifyError::Mismatch)
    }
}

/// Lower-case hex.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// Exactly `2 * N` hex digits (either case) to `N` bytes.
pub fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let digits = s.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; N];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231 test cases 1, 2, 6 and 7 (HMAC-SHA-256): a short key, a key shorter than the
    /// output, and keys longer than the block (hashed first).
    #[test]
    fn rfc_4231_vectors() {
        let cases: [(Vec<u8>, &[u8], &str); 4] = [
            (
                vec![0x0b; 20],
                b"Hi There",
                "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
            ),
            (
                b"Jefe".to_vec(),
                b"what do ya want for nothing?",
                "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            ),
            (
                vec![0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First",
                "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
            ),
            (
                vec![0xaa; 131],
                b"This is a test using a larger than block-size key and a larger than block-size data. The key needs to be hashed before being used by the HMAC algorithm.",
                "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
            ),
        ];
        for (key, data, want) in cases {
            assert_eq!(to_hex(&hmac_sha256(&key, &[data])), want);
            // Split input gives the same MAC.
            let (a, b) = data.split_at(data.len() / 2);
            assert_eq!(to_hex(&hmac_sha256(&key, &[a, b])), want);
        }
    }

    /// Known answers computed independently (Python's `hmac` module) over `"<t>.<body>"`.
    #[test]
    fn signature_known_answers() {
        let secret = b"0123456789abcdef-secret";
        assert_eq!(
            signature_header(secret, 1_700_000_000, br#"{"ok":true}"#),
            "t=1700000000,v1=871cc625722a16a97f5e0d5704584395e3f29d9f0c1eedcdc5ef522757e576e5"
        );
        assert_eq!(
            to_hex(&sign(b"whsec_test_secret_0123", 1_712_345_678, b"hello")),
            "6d757aa259b2758119c3d6bc992af1efd1e8c29384a675be5bb7775487c05e79"
        );
    }

    #[test]
    fn verify_accepts_its_own_and_refuses_tampering() {
        let secret = b"0123456789abcdef-secret";
        let body = b"result body";
        let header = signature_header(secret, 1000, body);
        assert_eq!(verify(secret, &header, body, 1000, 300), Ok(()));
        assert_eq!(verify(secret, &header, body, 1300, 300), Ok(()));
        assert_eq!(
            verify(secret, &header, body, 1301, 300),
            Err(VerifyError::Stale)
        );
        assert_eq!(
            verify(secret, &header, b"result bodY", 1000, 300),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify(b"another-secret-value", &header, body, 1000, 300),
            Err(VerifyError::Mismatch)
        );
        // The timestamp is signed: moving it breaks the signature.
        let moved = header.replace("t=1000", "t=1001");
        assert_eq!(
            verify(secret, &moved, body, 1000, 300),
            Err(VerifyError::Mismatch)
        );
        // Rotation: an extra v1 under another secret, in either order; unknown keys skipped.
        let old = to_hex(&sign(b"old-secret-0123456", 1000, body));
        let rotated = format!("{header},v1={old},v0=ignored");
        assert_eq!(verify(secret, &rotated, body, 1000, 300), Ok(()));
        assert_eq!(
            verify(b"old-secret-0123456", &rotated, body, 1000, 300),
            Ok(())
        );
        for bad in [
            "",
            "t=1000",
            "v1=00",
            "t=,v1=00",
            "t=-5,v1=871cc625722a16a97f5e0d5704584395e3f29d9f0c1eedcdc5ef522757e576e5",
            "t=1000,v1=zz1cc625722a16a97f5e0d5704584395e3f29d9f0c1eedcdc5ef522757e576e5",
            "t=1000,t=1000,v1=871cc625722a16a97f5e0d5704584395e3f29d9f0c1eedcdc5ef522757e576e5",
            "garbage",
        ] {
            assert_eq!(
                verify(secret, bad, body, 1000, 300),
                Err(VerifyError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn hex_round_trip() {
        let bytes = [0u8, 1, 0x7f, 0x80, 0xfe, 0xff];
        assert_eq!(to_hex(&bytes), "00017f80feff");
        assert_eq!(from_hex::<6>("00017F80FEFF"), Some(bytes));
        assert_eq!(from_hex::<6>("00017f80fef"), None);
        assert_eq!(from_hex::<2>("+1ff"), None);
        assert_eq!(from_hex::<1>("g0"), None);
    }
}
