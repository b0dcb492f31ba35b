//! The Dramatis desktop app's entry point.
// Keeps a console window from opening next to the app on Windows release builds.
#![cfg_attr(not(debug_assertions), windows_subsystem = "windows")]

#[allow(unsafe_code)]
fn main() {
    // SAFETY: first thing in main: no other thread exists yet.
    unsafe { dramatis_core::llm::threads::init_process(None) };
    dramatis::run();
}
