//! The shell's commands called through Tauri's IPC with the real config and
//! capabilities (mock runtime, no display), with valid and invalid payloads.

use dramatis::{Backend, app_builder};
use dramatis_core::Dramatis;
use serde_json::{Value, json};
use tauri::ipc::{CallbackFn, InvokeBody};
use tauri::test::{INVOKE_KEY, MockRuntime, get_ipc_response, mock_builder};
use tauri::webview::InvokeRequest;
use tauri::{App, Manager, WebviewWindow};

struct Shell {
    _dir: tempfile::TempDir,
    _app: App<MockRuntime>,
    window: WebviewWindow<MockRuntime>,
}

fn shell_with(backend: impl FnOnce(&std::path::Path) -> Backend) -> Shell {
    let dir = tempfile::tempdir().unwrap();
    let app = app_builder(mock_builder(), backend(dir.path()))
        .build(tauri::generate_context!())
        .unwrap();
    let window = match app.get_webview_window("main") {
        Some(w) => w,
        None => tauri::WebviewWindowBuilder::new(&app, "main", Default::default())
            .build()
            .unwrap(),
    };
    Shell {
        _dir: dir,
        _app: app,
        window,
    }
}

fn shell() -> Shell {
    shell_with(|dir| Backend::new(Dramatis::open(dir)))
}

impl Shell {
    fn invoke(&self, cmd: &str, args: Value) -> Result<Value, Value> {
        get_ipc_response(
            &self.window,
            InvokeRequest {
                cmd: cmd.into(),
                callback: CallbackFn(0),
                error: CallbackFn(1),
                url: "tauri://localhost".parse().unwrap(),
                body: InvokeBody::Json(args),
                headers: Default::default(),
                invoke_key: INVOKE_KEY.to_string(),
            },
        )
        .map(|body| body.deserialize::<Value>().unwrap())
    }
}

#[test]
fn gallery_lists_the_six_builtins_and_filters() {
    let s = shell();
    let all = s.invoke("list_characters", json!({})).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 6);
    let first = &all[0];
    assert!(first["tagline"].as_str().unwrap().len() > 10);
    assert!(first["avatar_version"].is_i64());
    let fantasy = s
        .invoke("list_characters", json!({"query": {"tag": "fantasy"}}))
        .unwrap();
    assert_eq!(fantasy.as_array().unwrap().len(), 2);
    let june = s
        .invoke("list_characters", json!({"query": {"search": "JUNE"}}))
        .unwrap();
    assert_eq!(june[0]["name"], "June Park");
    let tags = s.invoke("list_tags", json!({})).unwrap();
    assert!(
        tags.as_array()
            .unwrap()
            .iter()
            .any(|t| t["tag"] == "Mystery")
    );
}

#[test]
fn create_update_duplicate_delete_through_ipc() {
    let s = shell();
    let created = s
        .invoke(
            "create_character",
            json!({"draft": {"card": {"name": "Quill", "tags": ["Test"], "extensions": {"x_app": {"k": [1]}}}}}),
        )
        .unwrap();
    let id = created["id"].as_i64().unwrap();
    assert_eq!(created["card"]["extensions"]["x_app"]["k"][0], 1);
    let updated = s
        .invoke(
            "update_character",
            json!({"id": id, "draft": {"card": {"name": "Quill II", "description": "Scribe"}, "avatar": {"kind": "keep"}}}),
        )
        .unwrap();
    assert_eq!(updated["card"]["name"], "Quill II");
    let copy = s.invoke("duplicate_character", json!({"id": id})).unwrap();
    assert_eq!(copy["card"]["name"], "Quill II (copy)");
    s.invoke("delete_character", json!({"id": id})).unwrap();
    let err = s.invoke("get_character", json!({"id": id})).unwrap_err();
    assert_eq!(err["kind"], "not_found");
}

#[test]
fn invalid_payloads_get_typed_errors() {
    let s = shell();
    let err = s
        .invoke("create_character", json!({"draft": {"card": {"name": ""}}}))
        .unwrap_err();
    assert_eq!(err["kind"], "validation");
    assert_eq!(err["fields"][0]["field"], "name");
    let err = s
        .invoke(
            "create_character",
            json!({"draft": {"card": {"name": "Pic"}, "avatar": {"kind": "set", "data_base64": "bm90IGFuIGltYWdl"}}}),
        )
        .unwrap_err();
    assert_eq!(err["fields"][0]["field"], "avatar");
    // A payload of the wrong shape is refused by deserialization, not a panic.
    let err = s
        .invoke("get_character", json!({"id": "seven"}))
        .unwrap_err();
    assert!(err.as_str().unwrap().contains("id"), "{err}");
    let err = s.invoke("create_character", json!({})).unwrap_err();
    assert!(err.as_str().unwrap().contains("draft"), "{err}");
    assert_eq!(
        s.invoke("list_characters", json!({}))
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        6
    );
}

#[test]
fn commands_outside_the_capability_are_refused() {
    let s = shell();
    let err = s
        .invoke("plugin:fs|read_file", json!({"path": "/etc/passwd"}))
        .unwrap_err();
    assert!(!err.is_null());
}

#[test]
fn personas_through_ipc() {
    let s = shell();
    let list = s
        .invoke(
            "create_persona",
            json!({"draft": {"name": "Rook", "description": ""}}),
        )
        .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    let err = s
        .invoke("create_persona", json!({"draft": {"name": " "}}))
        .unwrap_err();
    assert_eq!(err["kind"], "validation");
}

#[test]
fn a_backend_that_failed_to_open_is_reported_by_every_command() {
    let s = shell_with(|dir| {
        drop(Dramatis::open(dir).unwrap());
        // Mark the database as written by a far newer Dramatis.
        rusqlite::Connection::open(dir.join("dramatis.db"))
            .unwrap()
            .pragma_update(None, "user_version", 999)
            .unwrap();
        Backend::new(Dramatis::open(dir))
    });
    let err = s.invoke("app_info", json!({})).unwrap_err();
    assert_eq!(err["kind"], "too_new", "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("newer version of Dramatis")
    );
    let err = s.invoke("list_characters", json!({})).unwrap_err();
    assert_eq!(err["kind"], "too_new");
}
