//! The S3 server of the tests must enforce conditional PUT the way cachevol relies on it:
//! `PutMode::Create` (If-None-Match: *) never replaces an existing object, also when writers
//! race, and `PutMode::Update` (If-Match) refuses a stale version. Generations are created this
//! way, so if the server did not enforce it, two commits could both "win" one generation.

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_put_create_refuses_existing_objects() {
    let Some(url) = common::s3_url("conditional") else {
        return;
    };
    let (s3, prefix) = common::raw_store(&url);
    let loc = prefix.clone().join("obj");
    common::conditional::create_then_swap(&s3, &loc, |e| {
        matches!(
            e,
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }
        )
    })
    .await;

    // cachevol's own wrapper reports the loser as "already there", and a stale swap loses.
    common::conditional::store_create_then_swap(&url, &prefix).await;
}

/// Many writers create one object at once: exactly one succeeds, and the object holds its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_put_create_has_exactly_one_winner_under_races() {
    let Some(url) = common::s3_url("conditional-race") else {
        return;
    };
    let (s3, prefix) = common::raw_store(&url);
    common::conditional::create_races(&s3, &prefix, 25, |e| {
        matches!(
            e,
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }
        )
    })
    .await;
}
