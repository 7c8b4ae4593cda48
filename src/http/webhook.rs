//! Online/offline webhooks: the management server learns when an endpoint's first resource comes
//! online and its last goes offline, as batched, retried, HMAC-signed JSON POSTs (`[webhooks]`).
//!
//! SKELETON: filled in by the webhook work; `start` returns `None` until then.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::WebhooksConfig;
use crate::xmpp::router::SessionEvents;

/// Start the delivery task when `config.urls` is not empty; the returned sink goes to
/// [`crate::xmpp::router::Router::set_events`]. The task stops on `cancel` (after a last attempt to
/// send what is pending) and is tracked by `tracker`.
pub fn start(
    config: &WebhooksConfig,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Option<Arc<dyn SessionEvents>> {
    let _ = (config, cancel, tracker);
    None
}
