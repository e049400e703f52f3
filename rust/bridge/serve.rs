//! The `serve_forever()` loop of `BaseServer`, run in Rust.
//!
//! Same order as the stdlib's loop: wait up to `poll_interval`; if `shutdown()` was
//! requested meanwhile, leave at once (bpo-35017); otherwise handle what the wait
//! brought, call `service_actions()`, and check the request again. The flag is the
//! server's own `_BaseServer__shutdown_request` attribute, so `shutdown()` keeps the
//! stdlib's meaning; the engine's waker only makes the wait return at once.
//! `service_actions` is passed only when a subclass overrides it (the base method does
//! nothing, so skipping it is invisible). Pending Python signal handlers run before
//! every wait.

use pyo3::intern;
use pyo3::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct StopFlag<'a, 'py> {
    server: &'a Bound<'py, PyAny>,
}

impl StopFlag<'_, '_> {
    pub fn is_set(&self) -> PyResult<bool> {
        let py = self.server.py();
        self.server
            .getattr(intern!(py, "_BaseServer__shutdown_request"))?
            .is_truthy()
    }
}

/// Run rounds until shutdown is requested. A round waits, handles what it got, and
/// returns true if it saw the shutdown request after its wait.
///
/// `wakes` is the waiting side's count of `wake()` calls. Each round gets the count as
/// it was read *before* that round's look at the shutdown flag: a wait that ends as
/// soon as the count differs can then never miss a `shutdown()` that set the flag just
/// after the look, even when another thread's wait consumed the waker's event.
pub fn serve_forever<'py>(
    server: &Bound<'py, PyAny>,
    service_actions: Option<&Bound<'py, PyAny>>,
    wakes: &AtomicU64,
    mut round: impl FnMut(&StopFlag<'_, 'py>, u64) -> PyResult<bool>,
) -> PyResult<()> {
    let stop = StopFlag { server };
    let py = server.py();
    // Run pending signal handlers before every wait: a signal delivered while this
    // thread ran Rust code, or received by another thread (which does not interrupt
    // this thread's wait), is acted on within one `poll_interval`, as in the stdlib,
    // whose loop runs Python code between its waits.
    loop {
        let seen = wakes.load(Ordering::Acquire);
        if stop.is_set()? {
            break;
        }
        py.check_signals()?;
        if round(&stop, seen)? {
            break;
        }
        if let Some(actions) = service_actions {
            actions.call0()?;
        }
    }
    Ok(())
}
