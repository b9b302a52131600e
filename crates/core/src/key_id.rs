//! A key's public id (`key_` + 16 characters from the admin plane), kept inline: the snapshot
//! holds one per key, and a million `Arc<str>` cost a million small allocations (16 bytes of
//! pointer plus 48 of heap each) where an inline id costs 24 bytes. An id too long to fit
//! (none the admin plane mints) is kept on the heap.

use std::fmt;
use std::sync::Arc;

/// Longest id kept inline.
const INLINE: usize = 22;

#[derive(Clone, PartialEq, Eq, Hash)]
pub enum KeyId {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Arc<str>),
}

impl KeyId {
    pub fn new(id: &str) -> KeyId {
        if id.len() <= INLINE {
            let mut bytes = [0u8; INLINE];
            bytes[..id.len()].copy_from_slice(id.as_bytes());
            KeyId::Inline {
                len: id.len() as u8,
                bytes,
            }
        } else {
            KeyId::Heap(Arc::from(id))
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            // Copied from a `&str` whole, so always UTF-8; checked rather than assumed
            // (this crate forbids unsafe code).
            KeyId::Inline { len, bytes } => std::str::from_utf8(&bytes[..*len as usize]).unwrap_or_default(),
            KeyId::Heap(s) => s,
        }
    }
}

impl std::ops::Deref for KeyId {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for KeyId {
    fn from(id: &str) -> KeyId {
        KeyId::new(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_read_back_as_given_inline_or_not() {
        let minted = crate::ids::new_key_id();
        for id in [
            "",
            "key_1",
            minted.as_str(),
            &"k".repeat(INLINE),
            &"k".repeat(INLINE + 1),
            "key_é✓",
        ] {
            let k = KeyId::new(id);
            assert_eq!(k.as_str(), id);
            assert_eq!(k.to_string(), id);
            assert_eq!(k, KeyId::from(id));
        }
        assert!(
            matches!(KeyId::new(&minted), KeyId::Inline { .. }),
            "minted ids fit inline"
        );
        assert!(matches!(KeyId::new(&"k".repeat(INLINE + 1)), KeyId::Heap(_)));
        assert_eq!(std::mem::size_of::<KeyId>(), 24);
    }
}
