//! Ops: each op has its forward, backward rule and CPU kernel side by side.
