//! The embedded cache against the shared adapter contract.
use std::time::Duration;

use nearby_store_memory::MemoryCache;

#[tokio::test]
async fn memory_cache_conforms() {
    let cache = MemoryCache::new(Duration::from_millis(100));
    nearby_conformance::location_cache(cache.as_ref(), 0).await;
    // The sweeper, not only reads, removed the expired entry: only `a`
    // is left (`b` was removed by the contract).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cache.len(), 1);
}
