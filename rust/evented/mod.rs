//! The evented path (an extension): handlers shaped like `asyncio.Protocol` run on
//! the serving thread's event loop, one GIL hold per batch of ready connections.
//!
//! - [`event_loop`]: `EventLoop`, its detached I/O phase and attached callback phase;
//! - [`transport`]: what protocols write to (queues, flow control, extra info);
//! - [`proxy`]: connections still sending their PROXY protocol header;
//! - [`native`]: `NativeEcho`, a protocol in Rust (the benchmark's ceiling).

pub mod event_loop;
pub mod native;
pub mod proxy;
pub mod transport;

use pyo3::prelude::*;

/// Add this path's classes to the engine's module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<event_loop::EventLoop>()?;
    m.add_class::<transport::BaseTransport>()?;
    m.add_class::<transport::Transport>()?;
    m.add_class::<transport::DatagramTransport>()?;
    m.add_class::<native::NativeEcho>()?;
    Ok(())
}
