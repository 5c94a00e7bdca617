//! The `tilt` command line. (Being built: see issue 3.)

fn main() {
    eprintln!("tilt: not yet implemented: the runtime lands with issue 3");
    std::process::exit(2);
}
