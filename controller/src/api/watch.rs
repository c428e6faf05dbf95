//! `GET /api/v2/watch`: Server-Sent Events of every stored event, resumable
//! from `Last-Event-ID` (or `?after=`) without gaps or duplicates.

use super::AppState;
use super::extract::ApiQuery;
use super::problem::Problem;
use crate::metrics::Metrics;
use crate::watch::{Start, subscribe};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::json;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchQuery {
    /// Resume after this position (same as `Last-Event-ID`).
    after: Option<i64>,
}

/// Counts a watch client for as long as its stream lives.
struct Watching(Arc<Metrics>);

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.watch_clients.dec();
    }
}

pub async fn watch(
    State(s): State<AppState>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<WatchQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Problem> {
    let last_id = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|t| t.trim().parse::<i64>().ok())
                .filter(|p| *p >= 0)
                .ok_or_else(|| {
                    Problem::bad_request(
                        "Last-Event-ID must be an event position (a non-negative integer)",
                    )
                })?,
        ),
        None => None,
    };
    let start = match last_id.or(q.after) {
        Some(p) if p < 0 => return Err(Problem::bad_request("after must be non-negative")),
        Some(p) => {
            // A position the log has not reached would be waited for in
            // silence (and its events skipped once they come): refused.
            let head = s.store.head().await?;
            if p > head {
                return Err(Problem::bad_request(format!(
                    "position {p} is beyond the head of the event log ({head}): resume after a \
                     position this stream sent, or after={head} for what comes next"
                ))
                .with("head", json!(head)));
            }
            Start::After(p)
        }
        None => Start::Now,
    };
    let subscription = subscribe(s.store.clone(), &s.hub, start, s.watch_queue);
    s.metrics.watch_clients.inc();
    let guard = Watching(s.metrics.clone());
    let (events, lagged) = subscription.split();
    let metrics = s.metrics.clone();
    // After the last event: if the client fell behind, one `lagged` event
    // saying where to resume (its last event id), then the end.
    let notice = futures_util::stream::once(async move {
        let resume_after = lagged()?;
        metrics.watch_clients_lagged.inc();
        tracing::info!(
            resume_after,
            "watch client too slow; disconnected with its resume position"
        );
        Some(
            Event::default().event("lagged").data(
                json!({
                    "resume_after": resume_after,
                    "detail": "this client fell too far behind and was disconnected; \
                               reconnect with Last-Event-ID to resume",
                })
                .to_string(),
            ),
        )
    });
    let stream = ReceiverStream::new(events)
        .map_while(move |item| {
            let _alive = &guard;
            match item {
                Ok(item) => Some(Some(
                    Event::default()
                        .id(item.position.to_string())
                        .event(item.event_type)
                        .data(String::from_utf8_lossy(&item.json)),
                )),
                Err(e) => {
                    tracing::warn!(error = %e, "watch stream ended by a store error");
                    None
                }
            }
        })
        .chain(notice)
        .filter_map(|e| e.map(Ok::<_, Infallible>));
    let stream = futures_util::StreamExt::take_until(stream, s.shutdown.clone().cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
