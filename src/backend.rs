//! Where the API's answers come from: the workers alone (standalone), or the workers and the
//! shared store (cluster mode). The HTTP thread holds one [`Backend`] and asks it; it is the
//! seam a new store plugs into, so that neither the API nor the lifecycle branch on the mode.

use crate::cluster::{Cluster, Unavailable};
use crate::flusher::{Node, StoreView};
use crate::store::{Applied, Verdict};
use crate::wire::{AppKey, Event};

pub enum Backend {
    /// Every count lives in this process's workers.
    Standalone(Cluster),
    /// The workers hold what this node has not flushed; the store holds the rest. Boxed:
    /// a connection is large, and there is one backend per process.
    Shared {
        workers: Cluster,
        view: Box<StoreView>,
    },
}

impl Backend {
    /// This process's workers.
    pub fn workers(&self) -> &Cluster {
        match self {
            Backend::Standalone(workers) | Backend::Shared { workers, .. } => workers,
        }
    }

    /// Cluster mode's node state, for `/metrics` and the shutdown report.
    pub fn node(&self) -> Option<&std::sync::Arc<Node>> {
        match self {
            Backend::Standalone(_) => None,
            Backend::Shared { view, .. } => Some(view.node()),
        }
    }

    pub fn query(&mut self, app: AppKey) -> Result<Verdict, Unavailable> {
        match self {
            Backend::Standalone(workers) => workers.query(app),
            Backend::Shared { workers, view } => view.query(workers, app),
        }
    }

    pub fn reset_all(&mut self) -> Result<(), Unavailable> {
        match self {
            Backend::Standalone(workers) => workers.reset_all(),
            Backend::Shared { workers, view } => view.reset_all(workers),
        }
    }

    pub fn reset_app(&mut self, app: AppKey) -> Result<(), Unavailable> {
        match self {
            Backend::Standalone(workers) => workers.reset_app(app),
            Backend::Shared { workers, view } => view.reset_app(workers, app),
        }
    }

    /// Counts one event that arrived over HTTP on one worker; in cluster mode it is flushed
    /// with the worker's other deltas.
    pub fn apply(&self, event: Event) -> Result<Applied, Unavailable> {
        self.workers().apply(event)
    }

    /// Why the node cannot answer queries right now, if it cannot.
    pub fn unhealthy(&self) -> Option<&'static str> {
        match self {
            Backend::Shared { view, .. } if !view.healthy() => Some("store unavailable"),
            _ => None,
        }
    }
}
