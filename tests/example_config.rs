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
        // A key in a section is written `name = ` under `[section]`.
        let spelled = hubbub::config::file_name(key);
        let (section, name) = match spelled.split_once('.') {
            Some((section, name)) => (Some(section), name),
            None => (None, spelled.as_str()),
        };
        if let Some(section) = section {
            assert!(
                text.contains(&format!("[{section}]")),
                "[{section}] undocumented"
            );
        }
        assert!(
            text.contains(&format!("\n{name} = ")) || text.contains(&format!("# {name} = ")),
            "{key} undocumented"
        );
    }
}
