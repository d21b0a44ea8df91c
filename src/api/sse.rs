//! Server-sent events: `data: <one-line JSON>` events, keep-alive comments
//! on quiet streams, and the headers that stop proxies from buffering.

use std::convert::Infallible;
use std::time::Duration;

use axum::http::{HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::Serialize;

/// A `data:` event holding `value` as JSON.
pub fn json_event<T: Serialize>(value: &T) -> Event {
    Event::default().data(serde_json::to_string(value).expect("wire types always serialize"))
}

/// The terminating `data: [DONE]`.
pub fn done_event() -> Event {
    Event::default().data("[DONE]")
}

/// A streaming response over `events`.
pub fn response<S>(events: S, keepalive: Duration) -> Response
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    let mut res = Sse::new(events).keep_alive(KeepAlive::new().interval(keepalive).text("keep-alive")).into_response();
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}

/// The end of a stream that failed: the error event, then `[DONE]`.
pub fn error_end(error: &super::ApiError) -> (Vec<Event>, bool) {
    (vec![error.sse_event(), done_event()], true)
}

/// The end of a stream whose choices all finished: the usage chunk when
/// asked for, then `[DONE]`.
pub fn closing(usage_chunk: Option<Event>) -> Vec<Event> {
    usage_chunk.into_iter().chain(std::iter::once(done_event())).collect()
}

/// Turns generation pieces into SSE events for one endpoint's wire shape.
pub trait Formatter: Send + 'static {
    /// Events for one piece; `true` ends the stream after them (an error).
    fn piece(&mut self, piece: super::generation::Piece) -> (Vec<Event>, bool);
    /// Events after every choice has ended (usage, `[DONE]`).
    fn finish(&mut self) -> Vec<Event>;
}

/// The SSE event stream of merged choices, formatted by `f`.
pub fn events<P, F>(pieces: P, f: F) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static
where
    P: Stream<Item = super::generation::Piece> + Send + Unpin + 'static,
    F: Formatter,
{
    use futures_util::StreamExt;
    struct St<P, F> {
        pieces: P,
        f: F,
        queue: std::collections::VecDeque<Event>,
        ended: bool,
    }
    let st = St { pieces, f, queue: Default::default(), ended: false };
    futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(e) = st.queue.pop_front() {
                return Some((Ok(e), st));
            }
            if st.ended {
                return None;
            }
            match st.pieces.next().await {
                Some(p) => {
                    let (evs, stop) = st.f.piece(p);
                    st.queue.extend(evs);
                    if stop {
                        st.ended = true;
                    }
                }
                None => {
                    let evs = st.f.finish();
                    st.queue.extend(evs);
                    st.ended = true;
                }
            }
        }
    })
}
