//! The volume model: what a cachevol volume is and the settings around it, with no gRPC, no
//! Kubernetes and no command line. The layers above it — the node's volumes, the CSI services,
//! the cluster adapter and the daemons — all speak these types; it depends only on the engine
//! (names, merge, GC policy).
//!
//! - [`VolumeSpec`] and its attribute, parameter and annotation names ([`attr`], [`param`],
//!   [`user`]); [`Mode`], [`Policy`], [`CommitOn`];
//! - [`PodRef`] (the pod a publish is for) and [`Ending`] (how a view's pods ended);
//! - [`records`]: the controller's durable record of the volumes it created;
//! - [`DriverName`]: the driver's name and the cluster-wide names derived from it ([`driver`]);
//! - sizes, durations and retention settings as users write them ([`parse_size`],
//!   [`parse_duration`], [`Retention`]).

pub mod driver;
mod error;
mod pod;
pub mod records;
mod settings;
mod volume;

pub use driver::DriverName;
pub use error::Error;
pub use pod::{Ending, PodRef};
pub use settings::{parse_duration, parse_size, Retention};
pub use volume::{attr, check_store_url, param, user, CommitOn, Mode, Policy, VolumeSpec};
