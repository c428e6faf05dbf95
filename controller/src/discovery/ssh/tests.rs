//! The script, the parser and the store, apart from any network. The
//! visits to a real sshd are in `sshd_tests.rs`.

use super::*;
use proptest::prelude::*;

#[test]
fn sys_root_validation() {
    assert_eq!(validate_sys_root(Path::new("/")).unwrap(), "");
    assert_eq!(
        validate_sys_root(Path::new("/run/kiwi-robot/")).unwrap(),
        "/run/kiwi-robot"
    );
    for bad in [
        "relative",
        "/tmp/a b",
        "/tmp/'x",
        "/tmp/$(reboot)",
        "/tmp/a;b",
        "/tmp/a\nb",
        "/tmp/`x`",
        "/tmp/a\"b",
        "/tmp/a\\b",
    ] {
        assert!(
            matches!(
                validate_sys_root(Path::new(bad)),
                Err(SshError::InvalidSysRoot(_))
            ),
            "{bad:?}"
        );
    }
    assert!(clue_script(Path::new("/x y")).is_err());
    let script = clue_script(Path::new("/run/kiwi-robot")).unwrap();
    assert!(script.starts_with("R='/run/kiwi-robot'\n"));
    // Every clue path the shared gatherer asks for is in the script.
    for p in [
        clue_paths::CPUINFO,
        clue_paths::MACHINE_ID,
        clue_paths::DECLARED_TYPE,
        clue_paths::V4L_BY_ID,
    ] {
        assert!(script.contains(p), "{p}");
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|c| c.iter().map(|b| format!(" {b:02x}")).collect::<String>() + "\n")
        .collect()
}

#[test]
fn parses_the_scripts_format() {
    let text = format!(
        "@kiwi clues 1\n@kiwi F proc/cpuinfo\n{}@kiwi .\n@kiwi F etc/hostname\n{}@kiwi .\n\
         @kiwi F etc/kiwi/robot-type\n@kiwi .\n\
         @kiwi D dev\nnull\nttyACM0\n@kiwi .\n@kiwi end\n",
        hex(b"Serial : 100000000000a001\nModel : Raspberry Pi 4 Model B Rev 1.4\n"),
        hex(b"lekiwi-1\n"),
    );
    let out = parse_clue_output(text.as_bytes()).unwrap();
    // A login shell's chatter before the header is skipped.
    let noisy = format!("Welcome!\n\u{1b}[0m\n{text}");
    assert_eq!(parse_clue_output(noisy.as_bytes()).unwrap(), out);
    assert_eq!(out.files["etc/kiwi/robot-type"], b"");
    assert_eq!(out.dirs["dev"], ["null", "ttyACM0"]);
    let id = identify_host(&out.host_clues());
    assert_eq!(
        id.hardware_id,
        Some(HardwareId::PiSerial("100000000000a001".into()))
    );
    assert_eq!(id.hostname.as_deref(), Some("lekiwi-1"));
    assert_eq!(
        id.type_decision.robot_type,
        kiwi_protocol::RobotType::Lekiwi
    );
}

#[test]
fn bad_output_is_a_clear_error() {
    let cases: &[(&[u8], OutputError)] = &[
        (b"", OutputError::NoHeader),
        (b"Welcome to the robot\n", OutputError::NoHeader),
        (b"@kiwi clues 2\n@kiwi end\n", OutputError::NoHeader),
        (b"@kiwi clues 1\n@kiwi F a\n 41\n", OutputError::Truncated),
        (b"@kiwi clues 1\n", OutputError::Truncated),
    ];
    for (text, want) in cases {
        assert_eq!(parse_clue_output(text).unwrap_err(), *want);
    }
    for text in [
        &b"@kiwi clues 1\nhello\n@kiwi end\n"[..],
        b"@kiwi clues 1\n@kiwi F a\n 4g\n@kiwi .\n@kiwi end\n",
        b"@kiwi clues 1\n@kiwi F a\n 414\n@kiwi .\n@kiwi end\n",
        b"@kiwi clues 1\n@kiwi X a\n@kiwi .\n@kiwi end\n",
        b"@kiwi clues 1\n@kiwi F\n@kiwi end\n",
        b"@kiwi clues 1\n@kiwi F a\n@kiwi D b\n@kiwi end\n",
    ] {
        assert!(
            matches!(parse_clue_output(text), Err(OutputError::Malformed { .. })),
            "{}",
            String::from_utf8_lossy(text)
        );
    }
    assert_eq!(
        parse_clue_output(&vec![b'a'; MAX_OUTPUT + 1]).unwrap_err(),
        OutputError::TooLarge
    );
}

proptest! {
    #[test]
    fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_clue_output(&bytes);
        let mut framed = b"@kiwi clues 1\n".to_vec();
        framed.extend_from_slice(&bytes);
        let _ = parse_clue_output(&framed);
    }
}

fn test_key(seed: u8) -> PublicKey {
    let key = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&[seed; 32]);
    PublicKey::from(key.public)
}

#[test]
fn known_hosts_round_trip_and_forget() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state").join(KNOWN_HOSTS_FILE);
    let a: SocketAddr = "10.88.0.2:22".parse().unwrap();
    let b: SocketAddr = "[::1]:2222".parse().unwrap();
    let store = KnownHosts::open(&path).unwrap();
    assert_eq!(store.get(a), None);
    store.record(a, test_key(1)).unwrap();
    store.record(b, test_key(2)).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("10.88.0.2:22 ssh-ed25519 AAAA"), "{text}");

    let again = KnownHosts::open(&path).unwrap();
    assert_eq!(again.get(a).unwrap().key_data(), test_key(1).key_data());
    assert_eq!(again.get(b).unwrap().key_data(), test_key(2).key_data());
    assert_eq!(again.fingerprints().len(), 2);
    assert!(again.forget(a).unwrap());
    assert!(!again.forget(a).unwrap());
    let third = KnownHosts::open(&path).unwrap();
    assert_eq!(third.get(a), None);
    assert!(third.get(b).is_some());
    // No temporary files are left behind.
    assert_eq!(
        std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
        1
    );
}

#[test]
fn a_malformed_known_hosts_line_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(KNOWN_HOSTS_FILE);
    for text in [
        "10.88.0.2:22 ssh-ed25519\n",
        "10.88.0.2 ssh-ed25519 AAAA\n",
        "10.88.0.2:22 ssh-ed25519 not-base64!\n",
    ] {
        std::fs::write(&path, text).unwrap();
        assert!(
            matches!(KnownHosts::open(&path), Err(SshError::KnownHosts { .. })),
            "{text}"
        );
    }
    let key = test_key(3).to_openssh().unwrap();
    let mut words = key.split_whitespace();
    let (_, b64) = (words.next(), words.next().unwrap());
    std::fs::write(&path, format!("10.88.0.2:22 ecdsa-sha2-nistp256 {b64}\n")).unwrap();
    assert!(KnownHosts::open(&path).is_err());
}
