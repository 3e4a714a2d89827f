//! The conditional writes cachevol relies on, checked the same way on every object store
//! backend that offers them (S3 and Azure): create-only puts never replace, also when writers
//! race, and an update at a stale version is refused. `create_lost` says which errors a
//! backend uses for a create that lost.

use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

pub fn opts(mode: PutMode) -> PutOptions {
    PutOptions {
        mode,
        ..Default::default()
    }
}

/// Create, a second create (refused), an update at the current version (accepted), one at the
/// now stale version (refused, Precondition); the object then holds the accepted update.
/// Returns the version the first get saw, for backend-specific checks.
pub async fn create_then_swap(
    os: &Arc<dyn ObjectStore>,
    loc: &Path,
    create_lost: fn(&object_store::Error) -> bool,
) -> UpdateVersion {
    os.put_opts(
        loc,
        PutPayload::from_static(b"first"),
        opts(PutMode::Create),
    )
    .await
    .expect("creating a new object succeeds");
    let err = os
        .put_opts(
            loc,
            PutPayload::from_static(b"second"),
            opts(PutMode::Create),
        )
        .await
        .expect_err("creating an existing object must fail (If-None-Match: *)");
    assert!(create_lost(&err), "unexpected error: {err:?}");
    let got = os.get(loc).await.unwrap();
    let version = UpdateVersion {
        e_tag: got.meta.e_tag.clone(),
        version: got.meta.version.clone(),
    };
    assert_eq!(got.bytes().await.unwrap(), Bytes::from_static(b"first"));

    // Compare-and-swap: the current version wins once, a stale version is refused.
    os.put_opts(
        loc,
        PutPayload::from_static(b"third"),
        opts(PutMode::Update(version.clone())),
    )
    .await
    .expect("update at the current version succeeds");
    let err = os
        .put_opts(
            loc,
            PutPayload::from_static(b"fourth"),
            opts(PutMode::Update(version.clone())),
        )
        .await
        .expect_err("update at a stale version must fail (If-Match -> 412)");
    assert!(
        matches!(err, object_store::Error::Precondition { .. }),
        "unexpected error: {err:?}"
    );
    assert_eq!(
        os.get(loc).await.unwrap().bytes().await.unwrap(),
        Bytes::from_static(b"third")
    );
    version
}

/// `rounds` times, 8 writers create one object at once: exactly one succeeds, and the object
/// holds its data.
pub async fn create_races(
    os: &Arc<dyn ObjectStore>,
    prefix: &Path,
    rounds: usize,
    create_lost: fn(&object_store::Error) -> bool,
) {
    const WRITERS: usize = 8;
    for round in 0..rounds {
        let loc = prefix.clone().join(format!("gen-{round:03}"));
        let barrier = Arc::new(tokio::sync::Barrier::new(WRITERS));
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let (os, loc, barrier) = (os.clone(), loc.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                let body = format!("writer {w}").repeat(1000);
                barrier.wait().await;
                let res = os
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
                Err(e) if create_lost(&e) => {}
                Err(e) => panic!("writer {w}: unexpected error {e:?}"),
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "round {round}: {} writers created the same object: {winners:?}",
            winners.len()
        );
        let data = os.get(&loc).await.unwrap().bytes().await.unwrap();
        assert_eq!(
            data,
            Bytes::from(format!("writer {}", winners[0]).repeat(1000)),
            "round {round}: the object holds another writer's data than the winner's"
        );
    }
}

/// The same through cachevol's `Store` at `url` (objects under `prefix`): a create that lost
/// and a swap at a stale version are `Ok(false)`, never errors, and the winner's data stays.
pub async fn store_create_then_swap(url: &str, prefix: &Path) {
    let store = super::open(url);
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
    assert!(store
        .get(&prefix.clone().join("absent"))
        .await
        .unwrap()
        .is_none());
}
