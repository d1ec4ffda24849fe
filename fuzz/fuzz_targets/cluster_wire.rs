//! What a node reads from NATS: session entries, node announcements, forwarded commands and
//! their replies, event lines it addresses, sealed values. Anything is read without a panic;
//! nothing opens that was not sealed with the key for its purpose and context.
#![no_main]
use guestd::cluster::{node, publish, route, seal, store};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let keys = seal::Keyring::new(&[9; 32], &[[8; 32]]);
    // Bytes nobody sealed with these keys never open as anything.
    assert!(store::Entry::open("s-1", data, &keys).is_err());
    assert!(node::NodeEntry::open("n1", data, &keys).is_none());
    assert!(route::open_forward(&keys, "n1", 7, 0, data).is_err());
    assert!(route::open_reply(&keys, "f-1", data).is_err());
    let text = String::from_utf8_lossy(data);
    for p in [seal::Purpose::Entry, seal::Purpose::Node, seal::Purpose::Forward, seal::Purpose::Reply] {
        assert!(keys.open(p, &[b"s-1"], &text).is_err());
    }
    let _ = seal::Keyring::kid_of(&text);
    let _ = route::from_wire(data);
    let (conv, id) = publish::address(data, "n1-boot");
    assert!(conv == "none" || guestd::cluster::valid_token(&conv));
    assert!(!id.is_empty());
    assert_eq!(keys.private_id(&id).len(), 32);
    // Anything sealed opens again, only for its own purpose and context.
    let sealed = keys.seal(seal::Purpose::Entry, &[b"s-1", data], data);
    assert_eq!(keys.open(seal::Purpose::Entry, &[b"s-1", data], &sealed).unwrap(), data);
    assert!(keys.open(seal::Purpose::Reply, &[b"s-1", data], &sealed).is_err());
    assert!(keys.open(seal::Purpose::Entry, &[b"s-2", data], &sealed).is_err());
});
