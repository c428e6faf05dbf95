//! Generated requests through the real router keep the promises of
//! [`kiwi_controller::testing::rest::check_answer`]: no panic, no server
//! error but 503, every error a problem+json document with its status. The
//! fuzz target `rest_request` (`fuzz/`) drives the same target with its own
//! generator.

use kiwi_controller::store::auth::Role;
use kiwi_controller::testing::rest::{
    CONTENT_TYPES, Credential, HEADERS, KEYS, METHODS, Payload, RequestSpec, RestTarget, SEGMENTS,
    Segment, Target, VALUES,
};
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::Value;
use std::sync::LazyLock;

static TARGET: LazyLock<RestTarget> =
    LazyLock::new(|| RestTarget::start().expect("the REST target starts"));

/// Text with percent escapes (well-formed, malformed and of bytes that are
/// not UTF-8) among any characters.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9-]{0,12}",
        "(%[0-9A-Fa-f]{2}|%|[a-z0-9/?#.]|\\PC){0,24}",
        any::<String>(),
    ]
}

fn known_or<S: Strategy<Value = String>>(
    known: &'static [&'static str],
    other: S,
) -> impl Strategy<Value = String> {
    prop_oneof![3 => select(known).prop_map(String::from), 1 => other]
}

fn segment() -> impl Strategy<Value = Segment> {
    prop_oneof![
        3 => any::<usize>().prop_map(Segment::Robot),
        1 => any::<u128>().prop_map(Segment::Uuid),
        2 => text().prop_map(Segment::Text),
    ]
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        4 => (any::<usize>(), segment()).prop_map(|(route, id)| Target::Route { route, id }),
        1 => proptest::collection::vec(known_or(SEGMENTS, text()), 0..5)
            .prop_map(Target::Segments),
    ]
}

/// `key=value` pairs of known and made-up names, or any text.
fn query() -> impl Strategy<Value = Option<String>> {
    let pair =
        (known_or(KEYS, text()), known_or(VALUES, text())).prop_map(|(k, v)| format!("{k}={v}"));
    proptest::option::of(prop_oneof![
        3 => proptest::collection::vec(pair, 0..4).prop_map(|p| p.join("&")),
        1 => text(),
    ])
}

fn credential() -> impl Strategy<Value = Credential> {
    prop_oneof![
        1 => Just(Credential::Missing),
        6 => select(&[Role::Viewer, Role::Operator, Role::Admin][..]).prop_map(Credential::Role),
        1 => prop_oneof!["Bearer kiwi-api\\.v1\\.[a-z0-9.]{0,40}", "[ -~]{0,40}"]
            .prop_map(Credential::Text),
    ]
}

fn json() -> impl Strategy<Value = Value> {
    let scalar = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        known_or(VALUES, text()).prop_map(Value::from),
        "x{1000,1100}".prop_map(Value::from),
    ];
    let object = proptest::collection::vec((known_or(KEYS, text()), scalar.clone()), 0..4)
        .prop_map(|fields| Value::Object(fields.into_iter().collect()));
    prop_oneof![
        4 => object,
        1 => scalar.prop_recursive(3, 16, 4, |inner| {
            proptest::collection::vec(inner, 0..4).prop_map(Value::Array)
        }),
    ]
}

fn payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        2 => Just(Payload::Empty),
        1 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Payload::Bytes),
        4 => json().prop_map(Payload::Json),
        1 => any::<bool>().prop_map(|declared| Payload::Oversized { declared }),
    ]
}

fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
    let name = known_or(HEADERS, "[a-z-]{1,12}");
    let value = prop_oneof!["[0-9]{1,20}", "-?[0-9]{1,4}", "[ -~]{0,20}"];
    proptest::collection::vec((name, value), 0..3)
}

fn request() -> impl Strategy<Value = RequestSpec> {
    (
        prop_oneof![
            6 => Just(None),
            3 => select(METHODS).prop_map(|m| Some(m.to_string())),
            1 => "[A-Z]{1,8}|[ -~]{0,6}".prop_map(Some),
        ],
        target(),
        query(),
        credential(),
        proptest::option::of(known_or(CONTENT_TYPES, "[ -~]{0,30}")),
        headers(),
        payload(),
    )
        .prop_map(
            |(method, target, query, credential, content_type, headers, payload)| RequestSpec {
                method,
                target,
                query,
                credential,
                content_type,
                headers,
                payload,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn every_answer_is_a_success_or_a_problem(spec in request()) {
        TARGET.send(&spec).map_err(TestCaseError::fail)?;
    }
}

#[test]
fn the_target_holds_robots_to_act_on() {
    assert_eq!(TARGET.robots().len(), 3);
}

/// Found by the fuzz target (`fuzz/regressions/rest_request/`): routes that
/// read their `{id}` as a string refused one that is not UTF-8 once
/// percent-decoded with axum's plain-text 400.
#[test]
fn path_parameters_that_are_not_utf8_are_problems() {
    let table = kiwi_controller::api::route_table(false);
    for (route, spec) in table.iter().enumerate() {
        if !spec.path.contains("{id}") {
            continue;
        }
        let request = RequestSpec {
            method: None,
            target: Target::Route {
                route,
                id: Segment::Text("%FF".into()),
            },
            query: None,
            credential: Credential::Role(Role::Admin),
            content_type: None,
            headers: vec![],
            payload: Payload::Empty,
        };
        TARGET.send(&request).unwrap();
    }
}
