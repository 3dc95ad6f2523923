//! config.example.toml stays in step with the code.

use hubbub::Config;

#[test]
fn config_example_documents_every_key_with_its_default() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");
    let flags = hubbub::config::Settings {
        config: Some(path.into()),
        ..Default::default()
    };
    let from_file =
        hubbub::Config::resolve(&flags, &Default::default()).expect("config.example.toml loads");
    let defaults = Config::default();
    assert_eq!(format!("{from_file:?}"), format!("{defaults:?}"));
    let text = std::fs::read_to_string(path).expect("read");
    for key in hubbub::config::KEYS {
        assert!(
            text.contains(&format!("\n{key} = ")) || text.contains(&format!("# {key} = ")),
            "{key} undocumented"
        );
    }
}
