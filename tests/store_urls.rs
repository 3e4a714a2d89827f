//! The chart's values schema and the binary agree on what a store URL is: the schema's patterns
//! are the grammar of `engine::store`'s tables (`BUCKET_SCHEMES`, `PATH_CHARS`,
//! `LOCAL_PATH_REFUSED`), and a corpus of
//! URLs users write (and mistype) is accepted by the schema exactly when `StoreUrl::parse`
//! accepts it, so `helm install` refuses what the node or the controller would refuse at start.

use cachevol::engine::store::{StoreUrl, BUCKET_SCHEMES, LOCAL_PATH_REFUSED, PATH_CHARS};
use regex::Regex;

const SCHEMA: &str = include_str!("../charts/cachevol/values.schema.json");

/// The two places a store URL is written in the values: the store of every class without one,
/// and a StorageClass's own `store` parameter.
const STORE_FIELDS: &[&[&str]] = &[&["store", "url"], &["storageClass", "parameters", "store"]];

/// Every `pattern` the schema gives a store URL field.
fn schema_patterns() -> Vec<String> {
    let schema: serde_json::Value = serde_json::from_str(SCHEMA).unwrap();
    STORE_FIELDS
        .iter()
        .map(|path| {
            let mut node = &schema;
            for name in *path {
                node = &node["properties"][*name];
                assert!(!node.is_null(), "values.schema.json has no {path:?}");
            }
            node["pattern"]
                .as_str()
                .unwrap_or_else(|| panic!("{path:?} has no pattern"))
                .to_string()
        })
        .collect()
}

/// A character class of ASCII letters (lowercase only, or both cases) and digits and `extra`,
/// `-` last so that it stays literal.
fn class(upper: bool, extra: &str) -> String {
    let mut extra: Vec<char> = extra.chars().collect();
    extra.sort_by_key(|c| *c == '-');
    let escaped: String = extra
        .iter()
        .map(|c| match c {
            '\\' | ']' | '^' => format!("\\{c}"),
            c => c.to_string(),
        })
        .collect();
    format!("[{}a-z0-9{escaped}]", if upper { "A-Z" } else { "" })
}

/// The pattern the table describes, in the syntax JSON Schema (ECMA-262), Helm (Go's RE2) and
/// the regex crate share: the empty string (the chart's default store), an absolute path with
/// or without `file://`, or `scheme://bucket` with an optional path.
fn expected_pattern() -> String {
    // A path whose segments are made of `any` and hold a `not_dot`: not of dots only (`.`,
    // `..`), written without look-ahead, which RE2 has not.
    let path = |any: &str, not_dot: &str| {
        let segment = format!("{any}*{not_dot}{any}*");
        format!("/(?:{segment}(?:/{segment})*/?)?")
    };
    let local_refused: String = LOCAL_PATH_REFUSED
        .chars()
        .map(|c| match c {
            '\\' | ']' | '^' | '-' => format!("\\{c}"),
            c => c.to_string(),
        })
        .collect();
    let controls = "\\x00-\\x1f\\x7f-\\x9f";
    let local = path(
        &format!("[^/{local_refused}{controls}]"),
        &format!("[^/.{local_refused}{controls}]"),
    );
    let cloud = path(
        &class(true, PATH_CHARS),
        &class(true, &PATH_CHARS.replace('.', "")),
    );
    let mut alternatives = vec![format!("(?:file://)?{local}")];
    // Schemes sharing a bucket rule share one alternative.
    let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
    for (scheme, _, extra) in BUCKET_SCHEMES {
        match groups.iter_mut().find(|(e, _)| e == extra) {
            Some((_, schemes)) => schemes.push(scheme),
            None => groups.push((extra, vec![scheme])),
        }
    }
    for (extra, schemes) in groups {
        let edge = class(false, "");
        let bucket = format!("{edge}(?:{}*{edge})?", class(false, extra));
        let schemes = match schemes.as_slice() {
            [one] => one.to_string(),
            many => format!("(?:{})", many.join("|")),
        };
        alternatives.push(format!("{schemes}://{bucket}(?:{cloud})?"));
    }
    format!("^$|^(?:{})$", alternatives.join("|"))
}

#[test]
fn the_schema_states_the_binarys_table() {
    let expected = expected_pattern();
    for pattern in schema_patterns() {
        assert_eq!(
            pattern,
            expected,
            "values.schema.json's store URL pattern is not the one engine::store's table \
             describes; put this one in the schema:\n{}",
            serde_json::to_string(&expected).unwrap()
        );
    }
}

/// URLs users write, right and wrong.
const CORPUS: &[&str] = &[
    "file:///var/lib/cachevol/store",
    "file:///abs",
    "file:///abs/",
    "file:///",
    "/var/lib/cachevol/store",
    "/abs/dir/",
    "file://rel",
    "file://rel/dir",
    "file://localhost/abs",
    "file:",
    "file:/abs",
    "file:////abs",
    "relative/dir",
    "store",
    "s3://bucket",
    "s3://bucket/",
    "s3://bucket/prefix",
    "s3://bucket/prefix/",
    "s3://bucket/a/b/c",
    "s3://bucket/prefix//",
    "s3://bucket//prefix",
    "s3://my.bucket-1/p",
    "s3://my_bucket/p",
    "s3://Bucket/p",
    "s3://-bucket/p",
    "s3://bucket-/p",
    "s3://",
    "s3:///prefix",
    "s3:/bucket",
    "s3a://bucket/prefix",
    "S3://bucket/prefix",
    "S3A://bucket",
    "gs://b/p",
    "gs://b",
    "gs://my_bucket.x/p",
    "GS://b/p",
    "gs://b:443/p",
    "az://c/p",
    "az://c",
    "az://my-container/p/q",
    "az://my.container/p",
    "Az://c/p",
    "azure://c/p",
    "abfs://c/p",
    "abfss://c/p",
    "abfss://c@account.dfs.core.windows.net/p",
    "adl://c/p",
    "http://x/y",
    "https://bucket.s3.amazonaws.com/p",
    "ftp://x/y",
    "s3://key:secret@bucket/p",
    "az://c/p?sig=abc",
    "s3://bucket/p#frag",
    "s3://bucket/../p",
    "s3://bucket/a/../p",
    "s3://bucket/a/..",
    "s3://bucket/./p",
    "s3://bucket/..x/.y/x..",
    "s3://bucket/...",
    "s3://bucket/.../x",
    "/home/me/.cache/cachevol",
    "/Users/Jo Smith/.cache/cachevol/store",
    "file:///Users/Jo Smith/.cache/cachevol/store",
    "/home/jo@corp/.cache/cachevol",
    "/home/jo/ünï+x",
    "/home/jo/a?b",
    "/home/jo/a#b",
    "file:///home/jo/a%20b",
    "/home/jo/\tx",
    "/home/jo/\u{85}x",
    "/var/a//b",
    "/var/../etc",
    "file:///var/./x",
    "s3://bucket/a%2Fb",
    "s3://bucket/a b",
    "s3://bucket/p ",
    " s3://bucket/p",
    "s3://bucket/ünï",
    "s3://bucket/a~b_c-d.e",
    "s3://bucket/a+b",
];

#[test]
fn the_schema_accepts_a_store_url_exactly_when_the_binary_does() {
    let patterns: Vec<Regex> = schema_patterns()
        .iter()
        .map(|p| Regex::new(p).unwrap())
        .collect();
    let mut disagree = Vec::new();
    for url in CORPUS {
        let binary = StoreUrl::parse(url);
        for pattern in &patterns {
            if pattern.is_match(url) != binary.is_ok() {
                disagree.push(format!(
                    "{url:?}: schema {}, binary {binary:?}",
                    pattern.is_match(url)
                ));
            }
        }
    }
    assert!(disagree.is_empty(), "{disagree:#?}");
    // The empty value is the chart's "default store", never a URL the binary takes.
    for pattern in &patterns {
        assert!(pattern.is_match(""));
    }
    assert!(StoreUrl::parse("").is_err());
}

// The corpus is not trivially one-sided: the forms the issue names are refused, the ones the
// README and the chart show are accepted, and every scheme of the table opens its store.
#[test]
fn the_corpus_holds_both_answers() {
    for ok in [
        "file:///abs",
        "s3://bucket",
        "s3://bucket/prefix/",
        "gs://b/p",
        "az://c/p",
        "s3a://bucket/prefix",
        "azure://c/p",
        "abfs://c/p",
        "abfss://c/p",
    ] {
        assert!(StoreUrl::parse(ok).is_ok(), "{ok}");
    }
    for bad in [
        "file://rel",
        "S3://bucket/prefix",
        "s3:///prefix",
        "s3://bucket/../p",
        "s3://bucket//prefix",
        "abfss://c@account.dfs.core.windows.net/p",
    ] {
        assert!(StoreUrl::parse(bad).is_err(), "{bad}");
    }
    for (scheme, store, _) in BUCKET_SCHEMES {
        assert_eq!(
            StoreUrl::parse(&format!("{scheme}://b1/p")).as_ref(),
            Ok(store)
        );
    }
    assert_eq!(
        StoreUrl::parse("S3://bucket").unwrap_err(),
        "the scheme \"S3\" must be written in lowercase: s3://"
    );
}

/// Whether object_store's builder for `store` takes `url` (as `Store::open` hands it over),
/// built so that it never signs or sends anything: nothing here reaches a network.
fn object_store_takes(store: &StoreUrl, url: &str) -> Result<(), String> {
    use object_store::{aws, azure, gcp};
    match store {
        StoreUrl::S3 => aws::AmazonS3Builder::new()
            .with_url(url)
            .with_skip_signature(true)
            .build()
            .map(drop),
        StoreUrl::Gcs => gcp::GoogleCloudStorageBuilder::new()
            .with_url(url)
            .with_skip_signature(true)
            .build()
            .map(drop),
        StoreUrl::Azure => azure::MicrosoftAzureBuilder::new()
            .with_url(url)
            .with_account("cachevol")
            .with_skip_signature(true)
            .build()
            .map(drop),
        StoreUrl::Local(_) => Ok(()),
    }
    .map_err(|e| e.to_string())
}

// Every cloud URL the binary (and so the schema) accepts is one object_store opens, with the
// bucket the URL names: the table promises no scheme or bucket name the store library refuses.
#[test]
fn object_store_opens_every_cloud_url_the_binary_accepts() {
    let mut opened = 0;
    for url in CORPUS {
        let Ok(store) = StoreUrl::parse(url) else {
            continue;
        };
        if let Err(e) = object_store_takes(&store, url) {
            panic!("{url}: StoreUrl::parse accepts it as {store:?}, object_store does not: {e}");
        }
        opened += 1;
    }
    assert!(
        opened >= 10,
        "only {opened} URLs of the corpus are accepted"
    );
    // And the builders do refuse: an Azure container with a dot, which the table refuses too.
    let dotted = "az://my.container/p";
    assert!(object_store_takes(&StoreUrl::Azure, dotted).is_err());
    assert!(StoreUrl::parse(dotted).is_err());
}
