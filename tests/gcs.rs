//! The gs:// store against a real Google Cloud Storage bucket: some scenarios of the store
//! suite (tests/common/store_suite.rs: a round trip of a tree with everything a cache holds,
//! incremental commits, restores that read only part of a pack, racing commits), and the
//! conditional writes generations depend on (a create-only put has exactly one winner, a
//! replace at a stale generation is refused).
//!
//! Needs `CACHEVOL_TEST_GS_URL` (e.g. `gs://my-bucket/cachevol-test`) and object_store's
//! `GOOGLE_*` credentials (`GOOGLE_SERVICE_ACCOUNT` with a service-account key file, or
//! application default credentials). Without the URL every test is skipped with a message,
//! **also under CI**: no GCS emulator that .ci/run can install serves the XML API object_store
//! writes through (docs/storage.md, "Testing gs://"), so these run only where a bucket is configured:
//! they are opt-in, `common::Provider::OptIn`, the one exception to the CI rule of
//! `common::required`.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gcs_round_trip() {
    let Some(url) = gs_url("round-trip") else {
        return;
    };
    common::store_suite::round_trip(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gcs_incremental() {
    let Some(url) = gs_url("incremental") else {
        return;
    };
    common::store_suite::incremental(&url).await;
}

/// Ranged GETs: the store's own `get_range` at the start, middle and end of an object, and a
/// restore of a generation that needs only a small part of its packs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gcs_restore_reads_part_of_a_pack() {
    let Some(url) = gs_url("ranges") else {
        return;
    };
    common::store_suite::restore_reads_part_of_a_pack(&url).await;
}

/// Create-only puts never replace, a replace at a stale version is refused, and cachevol's
/// wrapper turns both into `Ok(false)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gcs_conditional_puts() {
    let Some(url) = gs_url("conditional") else {
        return;
    };
    let (gcs, prefix) = raw_store(&url);
    let loc = prefix.clone().join("obj");
    // object_store sends x-goog-if-generation-match: 0 for a create and the generation read for
    // an update; GCS answers 412 to both when they lose (a lost create is AlreadyExists).
    let version = common::conditional::create_then_swap(&gcs, &loc, gcs_create_lost).await;
    assert!(
        version.version.is_some(),
        "GCS answers with the object's generation (x-goog-generation), what updates match on"
    );

    // The same through cachevol's Store.
    common::conditional::store_create_then_swap(&url, &prefix).await;
}

/// Many writers create one object at once: exactly one succeeds, and the object holds its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gcs_put_create_has_exactly_one_winner_under_races() {
    let Some(url) = gs_url("conditional-race") else {
        return;
    };
    let (gcs, prefix) = raw_store(&url);
    // Fewer rounds than on the emulators: each is 8 requests to a real bucket.
    common::conditional::create_races(&gcs, &prefix, 5, gcs_create_lost).await;
}

/// Commits racing on one key each get their own generation, the head hint (a compare-and-swap)
/// ends on the newest, and every generation is its writer's tree whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gcs_race_replace() {
    let Some(url) = gs_url("commit-race") else {
        return;
    };
    common::store_suite::race_replace(&url).await;
}

/// A create-only put that lost: object_store turns GCS's 412 into AlreadyExists; Precondition is
/// accepted too, as on S3, in case a race is answered as a failed update.
fn gcs_create_lost(e: &object_store::Error) -> bool {
    matches!(
        e,
        object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }
    )
}
