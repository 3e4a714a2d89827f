//! Running one step over many items on every core: the tree-wide steps of a restore (making
//! directories, parsing the manifest, setting directory times) are system calls or parsing, and
//! on one thread they leave the other cores idle while nothing else can start.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::error::Result;

/// Below this many items a step runs on the calling thread: starting threads costs more.
const SERIAL_BELOW: usize = 64;
/// Items a thread takes at a time.
const BATCH: usize = 16;

/// How many threads a parallel step uses.
pub(crate) fn workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
}

/// Calls `f` on every item, on up to [`workers`] threads. Stops handing out items at the first
/// error and returns it (items already started finish).
pub(crate) fn each<T: Sync>(items: &[T], f: impl Fn(&T) -> Result<()> + Sync) -> Result<()> {
    let workers = workers().min(items.len().div_ceil(BATCH));
    if items.len() < SERIAL_BELOW || workers < 2 {
        return items.iter().try_for_each(f);
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error = Mutex::new(None);
    let work = || {
        while !failed.load(Ordering::Relaxed) {
            let start = next.fetch_add(BATCH, Ordering::Relaxed);
            if start >= items.len() {
                return;
            }
            for item in &items[start..(start + BATCH).min(items.len())] {
                if let Err(e) = f(item) {
                    failed.store(true, Ordering::Relaxed);
                    first_error.lock().expect("not poisoned").get_or_insert(e);
                    return;
                }
            }
        }
    };
    std::thread::scope(|s| {
        for _ in 1..workers {
            s.spawn(work);
        }
        work();
    });
    match first_error.into_inner().expect("not poisoned") {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Maps contiguous parts of `items` on up to [`workers`] threads and returns the results in
/// order: `f` gets a part and the index of its first item.
pub(crate) fn map_parts<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&[T], usize) -> R + Sync,
) -> Vec<R> {
    let workers = workers();
    if items.len() < SERIAL_BELOW || workers < 2 {
        return vec![f(items, 0)];
    }
    let per = items.len().div_ceil(workers);
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = items
            .chunks(per)
            .enumerate()
            .map(|(k, part)| s.spawn(move || f(part, k * per)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a parallel step does not panic"))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::error::Error;

    #[test]
    fn every_item_once() {
        let seen: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        let items: Vec<usize> = (0..1000).collect();
        each(&items, |&i| {
            seen[i].fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .unwrap();
        assert!(seen.iter().all(|n| n.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn an_error_is_returned_and_stops_the_rest() {
        let items: Vec<usize> = (0..10_000).collect();
        let done = AtomicUsize::new(0);
        let err = each(&items, |&i| {
            if i == 100 {
                return Err(Error::corrupt("x", "item 100"));
            }
            done.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .unwrap_err();
        assert!(err.to_string().contains("item 100"), "{err}");
        assert!(done.load(Ordering::Relaxed) < items.len() - 1);
    }

    #[test]
    fn parts_come_back_in_order() {
        let items: Vec<usize> = (0..1000).collect();
        let parts = map_parts(&items, |part, first| {
            assert_eq!(part[0], first);
            part.to_vec()
        });
        assert_eq!(parts.concat(), items);
    }
}
