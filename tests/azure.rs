//! The az:// store against Azurite (the Azure Storage emulator that .ci/run starts): a round
//! trip of a tree with everything a cache holds, an incremental second commit, restores that
//! read only part of a pack, and the conditional writes generations depend on (a create-only put
//! has exactly one winner, a replace at a stale version is refused).
//!
//! Needs `CACHEVOL_TEST_AZ_URL` (e.g. `az://cachevol/ci-123`) and object_store's Azure
//! variables: `AZURE_STORAGE_USE_EMULATOR=true`, `AZURITE_BLOB_STORAGE_URL=http://127.0.0.1:PORT`,
//! `AZURE_STORAGE_ACCOUNT_NAME` and `AZURE_STORAGE_ACCOUNT_KEY`. Without the URL every test is
//! skipped, or fails when `CI` is set.

mod common;

use bytes::Bytes;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn azure_round_trip() {
    let Some(url) = az_url("round-trip") else {
        return;
    };
    common::store_suite::round_trip(url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn azure_second_commit_uploads_only_the_change() {
    let Some(url) = az_url("incremental") else {
        return;
    };
    common::store_suite::second_commit_uploads_only_the_change(url).await;
}

/// Ranged GETs: the store's own `get_range` at the start, middle and end of an object, and a
/// restore of a generation that needs only a small part of its packs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn azure_restore_reads_part_of_a_pack() {
    let Some(url) = az_url("ranges") else {
        return;
    };
    common::store_suite::restore_reads_part_of_a_pack(url).await;
}

/// Create-only puts never replace, a replace at a stale version is refused, and cachevol's
/// wrapper turns both into `Ok(false)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn azure_conditional_puts() {
    let Some(url) = az_url("conditional") else {
        return;
    };
    let (az, prefix) = raw_store(&url);
    let loc = prefix.clone().join("obj");
    // Azure answers 409 to a create that lost, 412 ConditionNotMet to a stale update.
    let version = common::conditional::create_then_swap(&az, &loc, |e| {
        matches!(e, object_store::Error::AlreadyExists { .. })
    })
    .await;
    assert!(version.e_tag.is_some(), "Azure answers with an ETag");

    // The same through cachevol's Store.
    let store = open(&url);
    assert!(store.has_conditional_update());
    let full = prefix.clone().join("wrapped");
    assert!(store
        .put_create(&full, Bytes::from_static(b"a"))
        .await
        .unwrap());
    assert!(!store
        .put_create(&full, Bytes::from_static(b"b"))
        .await
        .unwrap());
    let (data, v1) = store.get(&full).await.unwrap().expect("the object exists");
    assert_eq!(data, Bytes::from_static(b"a"));
    // Swap with "expected absent" on an existing object loses.
    assert!(!store
        .put_swap(&full, Bytes::from_static(b"c"), None)
        .await
        .unwrap());
    assert!(store
        .put_swap(&full, Bytes::from_static(b"d"), Some(v1.clone()))
        .await
        .unwrap());
    assert!(
        !store
            .put_swap(&full, Bytes::from_static(b"e"), Some(v1))
            .await
            .unwrap(),
        "a swap at a stale version must lose"
    );
    let (data, _) = store.get(&full).await.unwrap().unwrap();
    assert_eq!(data, Bytes::from_static(b"d"));
    assert!(store.get(&prefix.join("absent")).await.unwrap().is_none());
}

/// Many writers create one object at once: exactly one succeeds, and the object holds its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn azure_put_create_has_exactly_one_winner_under_races() {
    let Some(url) = az_url("conditional-race") else {
        return;
    };
    let (az, prefix) = raw_store(&url);
    common::conditional::create_races(&az, &prefix, 15, |e| {
        matches!(e, object_store::Error::AlreadyExists { .. })
    })
    .await;
}

/// Commits racing on one key each get their own generation, and the head hint (a
/// compare-and-swap) ends on the newest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn azure_concurrent_commits_get_distinct_generations() {
    let Some(url) = az_url("commit-race") else {
        return;
    };
    common::store_suite::concurrent_commits_get_distinct_generations(url).await;
}
