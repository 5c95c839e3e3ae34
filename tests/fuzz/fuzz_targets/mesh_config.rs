//! A node agent's wg-quick style config.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = wg_mesh::config::Config::parse(text, "fuzz.conf") {
            // What is rendered reads back the same.
            let again = wg_mesh::config::Config::parse(&c.render(), "again.conf")
                .expect("rendered config parses");
            assert_eq!(again, c);
        }
    }
});
