//! Feeds arbitrary bytes to the manifest page decoder (spec:
//! format-spec/03-snapshot.md#pages). It must never panic; whatever
//! decodes must encode to the same bytes (a page's id is the hash of its
//! bytes, so its encoding is canonical), and the checks against a naming
//! snapshot must not panic whatever the row says.
#![no_main]

use cbtvault::format::page;
use cbtvault::format::snapshot::PageRow;
use cbtvault::format::PageId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(p) = page::decode(data) else {
        return;
    };
    let bytes = page::encode(&p).expect("a decoded page encodes");
    assert_eq!(bytes, data, "page encoding is canonical");
    let row = PageRow {
        page_no: p.first_index / p.page_blocks as u64,
        entry_count: p.entries.len() as u32,
        id: PageId([0; 32]),
    };
    for block_count in [0, 1, p.first_index, p.end_index(), u64::MAX] {
        for has_bitmap in [false, true] {
            let _ = page::check_use(&p, &row, p.page_blocks, block_count, has_bitmap);
        }
    }
});
