//! The embedded cache and bus against the shared adapter contract.
use std::time::Duration;

use nearby_store_memory::{MemoryBus, MemoryCache};

#[tokio::test]
async fn memory_cache_conforms() {
    let cache = MemoryCache::new(Duration::from_millis(100));
    nearby_conformance::location_cache(cache.as_ref(), 0).await;
    // The sweeper, not only reads, removed the expired entry.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cache.len(), 2);
}

#[tokio::test]
async fn memory_bus_conforms() {
    let bus = MemoryBus::new();
    nearby_conformance::pubsub(&bus, 0).await;
    assert_eq!(
        bus.hub().channel_count(),
        0,
        "unsubscribing left channels behind"
    );
}
