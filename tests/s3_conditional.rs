//! The S3 server of the tests must enforce conditional PUT the way cachevol relies on it:
//! `PutMode::Create` (If-None-Match: *) never replaces an existing object, also when writers
//! race, and `PutMode::Update` (If-Match) refuses a stale version. Generations are created this
//! way, so if the server did not enforce it, two commits could both "win" one generation.

mod common;

use bytes::Bytes;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

fn opts(mode: PutMode) -> PutOptions {
    PutOptions {
        mode,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_put_create_refuses_existing_objects() {
    let Some(url) = common::s3_url("conditional") else {
        return;
    };
    let (s3, prefix) = common::raw_store(&url);
    let loc = prefix.clone().join("obj");

    s3.put_opts(
        &loc,
        PutPayload::from_static(b"first"),
        opts(PutMode::Create),
    )
    .await
    .expect("creating a new object succeeds");
    let err = s3
        .put_opts(
            &loc,
            PutPayload::from_static(b"second"),
            opts(PutMode::Create),
        )
        .await
        .expect_err("creating an existing object must fail (If-None-Match: * -> 412)");
    assert!(
        matches!(
            err,
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }
        ),
        "unexpected error: {err:?}"
    );
    let got = s3.get(&loc).await.unwrap();
    let version = UpdateVersion {
        e_tag: got.meta.e_tag.clone(),
        version: got.meta.version.clone(),
    };
    assert_eq!(got.bytes().await.unwrap(), Bytes::from_static(b"first"));

    // Compare-and-swap: the current version wins once, a stale version is refused.
    s3.put_opts(
        &loc,
        PutPayload::from_static(b"third"),
        opts(PutMode::Update(version.clone())),
    )
    .await
    .expect("update at the current version succeeds");
    let err = s3
        .put_opts(
            &loc,
            PutPayload::from_static(b"fourth"),
            opts(PutMode::Update(version)),
        )
        .await
        .expect_err("update at a stale version must fail (If-Match -> 412)");
    assert!(
        matches!(err, object_store::Error::Precondition { .. }),
        "unexpected error: {err:?}"
    );
    assert_eq!(
        s3.get(&loc).await.unwrap().bytes().await.unwrap(),
        Bytes::from_static(b"third")
    );

    // cachevol's own wrapper reports the loser as "already there".
    let store = common::open(&url);
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
    assert_eq!(
        s3.get(&full).await.unwrap().bytes().await.unwrap(),
        Bytes::from_static(b"a")
    );
}

/// Many writers create one object at once: exactly one succeeds, and the object holds its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_put_create_has_exactly_one_winner_under_races() {
    let Some(url) = common::s3_url("conditional-race") else {
        return;
    };
    let (s3, prefix) = common::raw_store(&url);
    const WRITERS: usize = 8;
    for round in 0..25 {
        let loc = prefix.clone().join(format!("gen-{round:03}"));
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(WRITERS));
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let (s3, loc, barrier) = (s3.clone(), loc.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                let body = format!("writer {w}").repeat(1000);
                barrier.wait().await;
                let res = s3
                    .put_opts(&loc, PutPayload::from(body), opts(PutMode::Create))
                    .await;
                (w, res)
            }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            let (w, res) = t.await.unwrap();
            match res {
                Ok(_) => winners.push(w),
                Err(
                    object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. },
                ) => {}
                Err(e) => panic!("writer {w}: unexpected error {e:?}"),
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "round {round}: {} writers created the same object: {winners:?}",
            winners.len()
        );
        let data = s3.get(&loc).await.unwrap().bytes().await.unwrap();
        assert_eq!(
            data,
            Bytes::from(format!("writer {}", winners[0]).repeat(1000)),
            "round {round}: the object holds another writer's data than the winner's"
        );
    }
}
