//! Arbitrary HTTP requests (method, path, query, headers, credential, body)
//! through the controller's real router, in-process, on one embedded store
//! for the whole run. The target and the checks of every answer are
//! `kiwi_controller::testing::rest`, which the property test
//! `controller/tests/rest_props.rs` drives too; only the generator is here.

#![no_main]

use arbitrary::{Result, Unstructured};
use kiwi_controller::store::auth::Role;
use kiwi_controller::testing::rest::{
    CONTENT_TYPES, Credential, HEADERS, KEYS, METHODS, Payload, RequestSpec, RestTarget, SEGMENTS,
    Segment, Target, VALUES,
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::sync::LazyLock;

static TARGET: LazyLock<RestTarget> =
    LazyLock::new(|| RestTarget::start().expect("the REST target starts"));

/// Mostly one of `known`, else any text.
fn text(u: &mut Unstructured, known: &[&str]) -> Result<String> {
    if u.ratio(3, 4)? {
        Ok((*u.choose(known)?).to_string())
    } else {
        u.arbitrary()
    }
}

/// Text from bytes, some of them as percent escapes (of bytes that may not
/// be UTF-8), some as a bare `%`: what a URI may carry, decoded or not.
fn escaped(u: &mut Unstructured) -> Result<String> {
    let bytes: Vec<u8> = u.arbitrary()?;
    let mut out = String::new();
    for b in bytes {
        match b % 4 {
            0 => out.push_str(&format!("%{:02X}", u.arbitrary::<u8>()?)),
            1 => out.push('%'),
            _ => out.push(char::from(b)),
        }
    }
    Ok(out)
}

/// Up to `max` items made by `item`.
fn some<T>(
    u: &mut Unstructured,
    max: u8,
    mut item: impl FnMut(&mut Unstructured) -> Result<T>,
) -> Result<Vec<T>> {
    (0..u.int_in_range(0..=max)?).map(|_| item(u)).collect()
}

fn segment(u: &mut Unstructured) -> Result<Segment> {
    Ok(match u.int_in_range(0..=5)? {
        0..=2 => Segment::Robot(u.arbitrary::<u8>()?.into()),
        3 => Segment::Uuid(u.arbitrary()?),
        4 => Segment::Text(u.arbitrary()?),
        _ => Segment::Text(escaped(u)?),
    })
}

fn scalar(u: &mut Unstructured) -> Result<Value> {
    Ok(match u.int_in_range(0..=5)? {
        0 => Value::Null,
        1 => Value::from(u.arbitrary::<bool>()?),
        2 => Value::from(u.arbitrary::<i64>()?),
        3 => Value::from(u.arbitrary::<f64>()?),
        4 => Value::from(text(u, VALUES)?),
        _ => Value::from("x".repeat(u.int_in_range(1000..=1100)?)),
    })
}

fn payload(u: &mut Unstructured) -> Result<Payload> {
    Ok(match u.int_in_range(0..=7)? {
        0 | 1 => Payload::Empty,
        2 => Payload::Bytes(u.arbitrary()?),
        3 => Payload::Oversized {
            declared: u.arbitrary()?,
        },
        4 => Payload::Json(Value::Array(some(u, 4, scalar)?)),
        _ => Payload::Json(Value::Object(
            some(u, 4, |u| Ok((text(u, KEYS)?, scalar(u)?)))?
                .into_iter()
                .collect(),
        )),
    })
}

fn spec(u: &mut Unstructured) -> Result<RequestSpec> {
    let method = match u.int_in_range(0..=9)? {
        0..=5 => None,
        6..=8 => Some((*u.choose(METHODS)?).to_string()),
        _ => Some(u.arbitrary()?),
    };
    let target = if u.ratio(4, 5)? {
        Target::Route {
            route: u.arbitrary::<u8>()?.into(),
            id: segment(u)?,
        }
    } else {
        Target::Segments(some(u, 5, |u| {
            if u.ratio(1, 4)? {
                escaped(u)
            } else {
                text(u, SEGMENTS)
            }
        })?)
    };
    let query = match u.int_in_range(0..=3)? {
        0 => None,
        1 => Some(escaped(u)?),
        _ => Some(
            some(u, 4, |u| {
                Ok(format!("{}={}", text(u, KEYS)?, text(u, VALUES)?))
            })?
            .join("&"),
        ),
    };
    let credential = match u.int_in_range(0..=7)? {
        0 => Credential::Missing,
        1 => Credential::Text(u.arbitrary()?),
        _ => Credential::Role(*u.choose(&[Role::Viewer, Role::Operator, Role::Admin])?),
    };
    let content_type = if u.arbitrary()? {
        Some(text(u, CONTENT_TYPES)?)
    } else {
        None
    };
    let headers = some(u, 3, |u| Ok((text(u, HEADERS)?, u.arbitrary()?)))?;
    Ok(RequestSpec {
        method,
        target,
        query,
        credential,
        content_type,
        headers,
        payload: payload(u)?,
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = spec(&mut Unstructured::new(data)) else {
        return;
    };
    if let Err(broken) = TARGET.send(&spec) {
        panic!("{broken}\n{spec:#?}");
    }
});
