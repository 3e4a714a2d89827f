//! The az:// store against Azurite (the Azure Storage emulator that .ci/run starts): the
//! conditional writes generations depend on (a create-only put has exactly one winner, a replace
//! at a stale version is refused), as Azure answers them. What reads the same on every store
//! (round trips, incremental commits, scopes, ranged restores, racing commits, fencing, GC
//! racing commits) runs on Azurite too, from tests/common/store_suite.rs: the `azure` tests of
//! tests/roundtrip.rs, tests/races.rs and tests/gc_races.rs.
//!
//! Needs `CACHEVOL_TEST_AZ_URL` (e.g. `az://cachevol/ci-123`) and object_store's Azure
//! variables: `AZURE_STORAGE_USE_EMULATOR=true`, `AZURITE_BLOB_STORAGE_URL=http://127.0.0.1:PORT`,
//! `AZURE_STORAGE_ACCOUNT_NAME` and `AZURE_STORAGE_ACCOUNT_KEY`. Without the URL every test is
//! skipped, or fails when `CI` is set.

mod common;

use common::*;

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
    common::conditional::store_create_then_swap(&url, &prefix).await;
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
