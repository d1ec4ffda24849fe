//! What a node reads from NATS: session entries, node announcements, forwarded replies, event
//! lines it addresses, sealed values. Anything is read without a panic; a sealed value opens
//! only with its key and context.
#![no_main]
use guestd::cluster::{publish, route, seal, store};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = store::Entry::parse(data);
    let _ = serde_json::from_slice::<guestd::cluster::node::NodeEntry>(data);
    let _ = route::from_wire(data);
    let (conv, id) = publish::address(data, "n1-boot");
    assert!(conv == "none" || guestd::cluster::valid_token(&conv));
    assert!(!id.is_empty());
    let sealer = seal::Sealer::new(&[9; 32]);
    let text = String::from_utf8_lossy(data);
    assert!(sealer.open("cmd", &text).is_err() || text.len() >= 54);
    let sealed = sealer.seal("s-1", data);
    assert_eq!(sealer.open("s-1", &sealed).unwrap(), data);
});
