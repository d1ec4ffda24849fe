//! stdin: raw bytes split into lines (bad bytes, over-long lines, any chunking), each line
//! parsed as a command. Nothing panics; every line comes out as an item.
#![no_main]
use guestd::control::{Line, parse_line, split_lines};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let chunk = data.first().map_or(1, |b| usize::from(*b % 64) + 1);
    for line in split_lines(data, 256, chunk) {
        if let Line::Text(t) = line {
            let _ = parse_line(&t);
        }
    }
});
