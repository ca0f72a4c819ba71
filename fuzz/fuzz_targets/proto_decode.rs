//! The protocol decoder on arbitrary bytes: it never panics, and whatever it
//! accepts encodes back to a message that decodes to the same thing.
#![no_main]

use libdma::proto::{Frame, Reply, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((seq, req)) = Request::decode(data) {
        let again = req.encode(seq);
        assert_eq!(Request::decode(&again), Ok((seq, req)));
    }
    if let Ok(r) = Reply::decode(data) {
        let again = r.encode();
        let back = Reply::decode(&again).expect("a re-encoded reply decodes");
        assert_eq!((back.op, back.seq, back.result), (r.op, r.seq, r.result));
        assert_eq!(back.payload, r.payload);
    }
    let _ = Frame::decode(data);
});
