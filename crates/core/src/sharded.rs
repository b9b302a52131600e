//! A hash map split into 4096 shards, each behind an `Arc`. Cloning the map copies 256
//! pointers; changing an entry copies only its shard (copy-on-write). So replacing a service's
//! keys in a million-key snapshot copies a few hundred entries per key, not a million, while a lookup stays one
//! plain hash-table probe. (A HAMT would share more but cost ~3× the memory per key.)

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

pub const SHARDS: usize = 4096;

/// Which shard a key lives in; must agree between a key and its borrowed form.
pub trait Shard {
    fn shard(&self) -> usize;
}

impl Shard for str {
    fn shard(&self) -> usize {
        // FNV-1a: stable, fast, good enough to spread ids over the shards.
        let mut h: u32 = 0x811c_9dc5;
        for b in self.bytes() {
            h = (h ^ b as u32).wrapping_mul(0x0100_0193);
        }
        (h as usize) % SHARDS
    }
}

impl Shard for Arc<str> {
    fn shard(&self) -> usize {
        (**self).shard()
    }
}

#[derive(Debug)]
pub struct ShardedMap<K, V, S> {
    shards: Vec<Arc<HashMap<K, V, S>>>,
    len: usize,
}

impl<K, V, S> Clone for ShardedMap<K, V, S> {
    fn clone(&self) -> Self {
        ShardedMap {
            shards: self.shards.clone(),
            len: self.len,
        }
    }
}

impl<K, V, S: Default> Default for ShardedMap<K, V, S> {
    fn default() -> Self {
        ShardedMap {
            shards: (0..SHARDS).map(|_| Arc::new(HashMap::default())).collect(),
            len: 0,
        }
    }
}

impl<K, V, S> ShardedMap<K, V, S>
where
    K: Hash + Eq + Clone + Shard,
    V: Clone,
    S: BuildHasher + Clone,
{
    pub fn get<Q>(&self, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + Shard + ?Sized,
    {
        self.shards[k.shard()].get(k)
    }

    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        let old = Arc::make_mut(&mut self.shards[k.shard()]).insert(k, v);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub fn remove<Q>(&mut self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + Shard + ?Sized,
    {
        let shard = &mut self.shards[k.shard()];
        // Only copy the shard if the key is there.
        if !shard.contains_key(k) {
            return None;
        }
        let old = Arc::make_mut(shard).remove(k);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.shards.iter().flat_map(|s| s.values())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::hash_map::RandomState;

    #[test]
    fn copy_on_write_leaves_clones_untouched() {
        let mut a: ShardedMap<Arc<str>, u32, RandomState> = ShardedMap::default();
        for i in 0..1000 {
            a.insert(Arc::from(format!("k{i}").as_str()), i);
        }
        let b = a.clone();
        a.insert(Arc::from("k1"), 99);
        a.remove("k2");
        a.insert(Arc::from("new"), 7);
        assert_eq!((a.len(), b.len()), (1000, 1000));
        assert_eq!((a.get("k1"), b.get("k1")), (Some(&99), Some(&1)));
        assert_eq!((a.get("k2"), b.get("k2")), (None, Some(&2)));
        assert_eq!((a.get("new"), b.get("new")), (Some(&7), None));
        // Only the touched shards were copied.
        let shared = a
            .shards
            .iter()
            .zip(&b.shards)
            .filter(|(x, y)| Arc::ptr_eq(x, y))
            .count();
        assert!(shared >= SHARDS - 3, "{shared} shards still shared");
        assert_eq!(a.values().count(), 1000);
        assert_eq!(a.remove("absent"), None);
    }
}
