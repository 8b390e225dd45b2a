//! Fuzzing the request decoder with proptest (bounded, so it runs in every CI run): no
//! input makes it panic, and every request survives encoding and decoding unchanged.

use fshost_protocol::{decode_request, to_line, Request};
use proptest::prelude::*;

fn request() -> impl Strategy<Value = Request> {
    let text = ".{0,40}";
    let options = proptest::collection::btree_map(text, text, 0..4);
    prop_oneof![
        (text, proptest::option::of(text)).prop_map(|(path, name)| Request::Load { path, name }),
        (text, any::<bool>(), proptest::option::of(any::<u64>())).prop_map(
            |(name, drain, timeout_secs)| Request::Unload {
                name,
                drain,
                timeout_secs
            }
        ),
        (text, text, options, any::<bool>()).prop_map(
            |(plugin, mountpoint, options, read_only)| {
                Request::Mount {
                    plugin,
                    mountpoint,
                    options,
                    read_only,
                }
            }
        ),
        (text, any::<bool>()).prop_map(|(mountpoint, lazy)| Request::Unmount { mountpoint, lazy }),
        Just(Request::List {}),
        Just(Request::Mounts {}),
        text.prop_map(|name| Request::Info { name }),
        Just(Request::Status {}),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_request(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn requests_round_trip(req in request()) {
        let line = to_line(&req);
        prop_assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        prop_assert_eq!(decode_request(line.trim_end()).unwrap(), req);
    }

    #[test]
    fn damaged_requests_never_panic(req in request(), cut in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut line = to_line(&req).into_bytes();
        let at = cut.index(line.len());
        line[at] = byte;
        let _ = decode_request(&String::from_utf8_lossy(&line));
        line.truncate(at);
        let _ = decode_request(&String::from_utf8_lossy(&line));
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(decode_request(&deep).is_err());
    let deep_object = format!("{{\"op\":\"list\",\"x\":{}}}", "[".repeat(50_000));
    assert!(decode_request(&deep_object).is_err());
}

#[test]
fn errors_name_the_problem() {
    let err = decode_request("{\"op\":\"mount\",\"plugin\":\"m\"}")
        .unwrap_err()
        .to_string();
    assert!(err.contains("mountpoint"), "{err}");
    let err = decode_request("{\"op\":\"frobnicate\"}")
        .unwrap_err()
        .to_string();
    assert!(err.contains("frobnicate"), "{err}");
}
