//! x25519 keys in WireGuard's text form (standard base64 of 32 bytes).

use base64::Engine as _;
use boringtun::x25519;

use crate::MeshError;

/// A private key. Its `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey([u8; 32]);

/// A public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PrivateKey {
    /// A new random key (from the OS's random source).
    pub fn generate() -> Result<PrivateKey, MeshError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)
            .map_err(|e| MeshError::BadKey(format!("no randomness: {e}")))?;
        Ok(PrivateKey(bytes))
    }

    /// Reads WireGuard's base64 form.
    pub fn from_base64(text: &str) -> Result<PrivateKey, MeshError> {
        decode(text).map(PrivateKey)
    }

    /// WireGuard's base64 form: a secret, for config files with mode 0600 only.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(x25519::PublicKey::from(&self.secret()).to_bytes())
    }

    /// boringtun's form.
    pub fn secret(&self) -> x25519::StaticSecret {
        x25519::StaticSecret::from(self.0)
    }
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivateKey(public {})", self.public())
    }
}

impl PublicKey {
    /// Reads WireGuard's base64 form.
    pub fn from_base64(text: &str) -> Result<PublicKey, MeshError> {
        decode(text).map(PublicKey)
    }

    /// boringtun's form.
    pub fn x25519(&self) -> x25519::PublicKey {
        x25519::PublicKey::from(self.0)
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

fn decode(text: &str) -> Result<[u8; 32], MeshError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| MeshError::BadKey(format!("not base64 ({e})")))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| MeshError::BadKey(format!("{} bytes, not 32", bytes.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_private_ones_never_print() {
        let k = PrivateKey::generate().unwrap();
        let text = k.to_base64();
        assert_eq!(text.len(), 44);
        assert_eq!(PrivateKey::from_base64(&text).unwrap(), k);
        assert_eq!(
            PublicKey::from_base64(&k.public().to_string()).unwrap(),
            k.public()
        );
        assert!(!format!("{k:?}").contains(&text));
        assert!(PublicKey::from_base64("AAAA").is_err());
        assert!(PublicKey::from_base64("not base64!").is_err());
    }

    #[test]
    fn the_public_key_is_x25519_of_the_private_one() {
        // RFC 7748 §6.1, Alice's keys.
        let alice =
            PrivateKey::from_base64("dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=").unwrap();
        assert_eq!(
            alice.public().to_string(),
            "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
        );
    }
}
