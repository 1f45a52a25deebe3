//! Stub until the simulator lands.
