//! Chat templates rendered as transformers renders them: every reference render in
//! tests/fixtures/templates/reference.jsonl (made by tools/make_template_reference.py with
//! transformers 5.25's `apply_chat_template(tokenize=False)`) comes out byte for byte, and what
//! transformers refuses fcgpu refuses; templates fcgpu cannot render fail with errors naming
//! the template; `fcgpu prompt` prints what generate and serve feed the model.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use fcgpu::chat_template::ChatTemplate;
use fcgpu::fc::prompt::{render_prompt_with, PromptStyle};
use fcgpu::model::tokenizer::Tokenizer;
use fcgpu::rollout::chat::ChatFormat;
use serde_json::{json, Map, Value};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn references() -> Vec<Value> {
    let text = std::fs::read_to_string(root().join("tests/fixtures/templates/reference.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn template_of(r: &Value) -> ChatTemplate {
    let path = r["template"].as_str().unwrap();
    if r["kind"] == "dir" {
        return ChatTemplate::load(&root().join(path)).unwrap();
    }
    let source = std::fs::read_to_string(root().join(path)).unwrap();
    let specials: Vec<(&str, &str)> =
        r["specials"].as_object().unwrap().iter().map(|(k, v)| (k.as_str(), v.as_str().unwrap())).collect();
    ChatTemplate::from_source(&source, path, &specials).unwrap()
}

#[test]
fn every_reference_render_is_byte_identical() {
    let refs = references();
    let (mut same, mut refused) = (0, 0);
    let mut conversations: HashSet<(String, String)> = HashSet::new();
    for r in &refs {
        let t = template_of(r);
        let messages = r["messages"].as_array().unwrap();
        let tools = r["tools"].as_array().map(|t| t.as_slice());
        let agp = r["add_generation_prompt"].as_bool().unwrap();
        let extra: Map<String, Value> = r["extra"].as_object().unwrap().clone();
        let got = t.render_with(messages, tools, agp, &extra);
        let what = format!("{} / {} (add_generation_prompt {agp})", r["template"], r["name"]);
        if let Some(e) = r.get("error") {
            let err = got.expect_err(&format!("{what}: transformers raised {e}, fcgpu rendered"));
            assert!(format!("{err:#}").contains(r["template"].as_str().unwrap()), "{what}: {err:#}");
            refused += 1;
        } else if r["ignores_tools"] == true {
            let err = got.expect_err(&format!("{what}: the template ignores tools; fcgpu must refuse them"));
            assert!(format!("{err:#}").contains("never reads `tools`"), "{what}: {err:#}");
            refused += 1;
        } else {
            assert_eq!(
                got.unwrap_or_else(|e| panic!("{what}: {e:#}")),
                r["text"].as_str().unwrap(),
                "{what}"
            );
            same += 1;
        }
        conversations.insert((r["template"].to_string(), r["name"].to_string()));
    }
    let templates: HashSet<&str> = refs.iter().map(|r| r["template"].as_str().unwrap()).collect();
    assert_eq!(templates.len(), 5, "SmolLM2's, the fixtures', the built-in, Llama 3 format, features");
    assert!(conversations.len() >= 5 * 20, "{} conversations", conversations.len());
    assert!(same >= 150 && refused >= 10, "{same} identical renders, {refused} refused");
}

/// SmolLM2's template inserts its own system message when the conversation has none.
#[test]
fn smollm2_adds_its_default_system_message() {
    let t = ChatTemplate::load(&root().join("tests/fixtures/templates/smollm2")).unwrap();
    let text = t.render(&[json!({"role": "user", "content": "Hi"})], None, true).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let own = t
        .render(
            &[json!({"role": "system", "content": "S"}), json!({"role": "user", "content": "Hi"})],
            None,
            false,
        )
        .unwrap();
    assert_eq!(own, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
}

fn bfcl_sample(id: &str) -> fcgpu::data::Sample {
    let samples = fcgpu::data::load_bfcl_dir(&root().join("tests/data/bfcl/v4")).unwrap();
    samples.into_iter().find(|s| s.id == id).unwrap()
}

/// BFCL prompts in the model's own format: the system prompt and the question in SmolLM2's
/// ChatML or in Llama 3 headers; `qwen-fc` gives the functions as `tools`, which a template
/// that never reads them refuses.
#[test]
fn bfcl_styles_render_in_the_models_template() {
    let s = bfcl_sample("simple_python_2");
    let builtin = render_prompt_with(None, &s, PromptStyle::Bfcl).unwrap();
    let smol = ChatTemplate::load(&root().join("tests/fixtures/templates/smollm2")).unwrap();
    // With BFCL's system message first, SmolLM2's template writes the same ChatML.
    assert_eq!(render_prompt_with(Some(&smol), &s, PromptStyle::Bfcl).unwrap(), builtin);
    let e = render_prompt_with(Some(&smol), &s, PromptStyle::QwenFc).unwrap_err();
    assert!(format!("{e:#}").contains("never reads `tools`"), "{e:#}");
    let src = std::fs::read_to_string(root().join("tests/fixtures/templates/llama3-tools.jinja")).unwrap();
    let llama =
        ChatTemplate::from_source(&src, "llama3-tools.jinja", &[("bos_token", "<|begin_of_text|>")]).unwrap();
    let text = render_prompt_with(Some(&llama), &s, PromptStyle::Reasoning).unwrap();
    assert!(text.starts_with("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"), "{text}");
    assert!(text.contains(fcgpu::fc::prompt::REASONING_INSTRUCTION));
    assert!(!text.contains("<|im_start|>"));
    assert!(text.ends_with("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"), "{text}");
    let fc = render_prompt_with(Some(&llama), &s, PromptStyle::QwenFc).unwrap();
    assert!(fc.contains("Given the following functions") && fc.contains("\"name\": \"math.hypot\""), "{fc}");
    // The compact style keeps its own format whatever the template.
    let compact = render_prompt_with(Some(&llama), &s, PromptStyle::Compact).unwrap();
    assert_eq!(compact, render_prompt_with(None, &s, PromptStyle::Compact).unwrap());
}

fn write_model_dir(dir: &Path, template: Option<&str>, config: Value) {
    std::fs::create_dir_all(dir).unwrap();
    if let Some(t) = template {
        std::fs::write(dir.join("chat_template.jinja"), t).unwrap();
    }
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}

fn user() -> Vec<Value> {
    vec![json!({"role": "user", "content": "hi"})]
}

#[test]
fn templates_fcgpu_cannot_render_fail_naming_the_template() {
    let tmp = tempfile::tempdir().unwrap();
    // No template at all: the model directory is named.
    let none = tmp.path().join("none");
    write_model_dir(&none, None, json!({"eos_token": "</s>"}));
    let e = ChatTemplate::load(&none).unwrap_err();
    assert!(format!("{e:#}").contains(&none.display().to_string()), "{e:#}");
    assert!(format!("{e:#}").contains("no chat template"), "{e:#}");
    // A syntax error: the file and the line.
    let bad = tmp.path().join("bad");
    write_model_dir(&bad, Some("{% for m in messages %}\n{{ m.content }\n{% endfor %}"), json!({}));
    let e = format!("{:#}", ChatTemplate::load(&bad).unwrap_err());
    assert!(e.contains(&format!("{}:2", bad.join("chat_template.jinja").display())), "{e}");
    // A filter the engine lacks: an error at render, never a guess.
    let unknown = tmp.path().join("unknown");
    write_model_dir(&unknown, Some("{{ messages[0].content | frobnicate }}"), json!({}));
    let e = format!("{:#}", ChatTemplate::load(&unknown).unwrap().render(&user(), None, true).unwrap_err());
    assert!(e.contains("frobnicate") && e.contains("chat_template.jinja"), "{e}");
    // A method Python has and the engine does not.
    let method = tmp.path().join("method");
    write_model_dir(&method, Some("{{ messages[0].content.zfill(5) }}"), json!({}));
    let e = format!("{:#}", ChatTemplate::load(&method).unwrap().render(&user(), None, true).unwrap_err());
    assert!(e.contains("zfill"), "{e}");
    // raise_exception reached: its message.
    let raise = tmp.path().join("raise");
    write_model_dir(
        &raise,
        Some("{% if messages[0].role != 'system' %}{{ raise_exception('a system message comes first') }}{% endif %}"),
        json!({}),
    );
    let e = format!("{:#}", ChatTemplate::load(&raise).unwrap().render(&user(), None, true).unwrap_err());
    assert!(e.contains("a system message comes first") && e.contains("raise"), "{e}");
    // A template that would run for ever runs out of fuel instead.
    let spin = tmp.path().join("spin");
    let looping = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
    write_model_dir(&spin, Some(looping), json!({}));
    assert!(ChatTemplate::load(&spin).unwrap().render(&user(), None, true).is_err());
    // A malformed `chat_template` field.
    let field = tmp.path().join("field");
    write_model_dir(&field, None, json!({"chat_template": 3}));
    let e = format!("{:#}", ChatTemplate::load(&field).unwrap_err());
    assert!(e.contains("tokenizer_config.json") && e.contains("chat_template"), "{e}");
}

/// `chat_template` as a list of named templates: `tool_use` renders when tools are given.
#[test]
fn named_templates_pick_tool_use_with_tools() {
    let tmp = tempfile::tempdir().unwrap();
    write_model_dir(
        tmp.path(),
        None,
        json!({"bos_token": {"content": "<s>", "lstrip": false}, "chat_template": [
            {"name": "default", "template": "{{ bos_token }}plain {{ messages | length }}"},
            {"name": "tool_use", "template": "{{ bos_token }}tools {{ tools | map(attribute='name') | join(',') }}"}
        ]}),
    );
    let t = ChatTemplate::load(tmp.path()).unwrap();
    assert_eq!(t.render(&user(), None, true).unwrap(), "<s>plain 1");
    assert_eq!(t.render(&user(), Some(&[json!({"name": "f"})]), true).unwrap(), "<s>tools f");
}

#[test]
fn strftime_now_formats_the_local_date() {
    let t = ChatTemplate::from_source("{{ strftime_now('%d %b %Y') }}", "date.jinja", &[]).unwrap();
    let d = t.render(&user(), None, true).unwrap();
    let re = regex::Regex::new(r"^\d\d [A-Z][a-z]{2} \d{4}$").unwrap();
    assert!(re.is_match(&d), "{d}");
}

fn fcgpu(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fcgpu")).args(args).output().unwrap();
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// `fcgpu prompt --messages` prints what `generate` and `serve` render; `--ids` the ids.
#[test]
fn prompt_command_prints_the_rendered_conversation() {
    let model: PathBuf = root().join("tests/fixtures/models/qwen2-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let messages =
        vec![json!({"role": "system", "content": "S"}), json!({"role": "user", "content": "Add 2 and 3."})];
    let file = tmp.path().join("chat.json");
    std::fs::write(&file, Value::Array(messages.clone()).to_string()).unwrap();
    let (m, f) = (model.to_str().unwrap(), file.to_str().unwrap());
    let (ok, text, err) = fcgpu(&["prompt", "--model", m, "--messages", f]);
    assert!(ok, "{err}");
    let want = ChatFormat::for_dir(&model).unwrap().render(&messages, None).unwrap();
    assert_eq!(text, want);
    assert!(text.ends_with("<|im_start|>assistant\n"));
    let (ok, bare, err) = fcgpu(&["prompt", "--model", m, "--messages", f, "--no-generation-prompt"]);
    assert!(ok, "{err}");
    assert_eq!(format!("{bare}<|im_start|>assistant\n"), text);
    let (ok, ids, err) = fcgpu(&["prompt", "--model", m, "--messages", f, "--ids"]);
    assert!(ok, "{err}");
    let ids: Vec<u32> = serde_json::from_str(ids.trim()).unwrap();
    assert_eq!(ids, Tokenizer::load(&model).unwrap().encode(&want, false).unwrap());
    // The fixture's template never reads tools: giving some is refused, naming the template.
    let tools = tmp.path().join("tools.json");
    std::fs::write(&tools, json!([{"type": "function", "function": {"name": "add"}}]).to_string()).unwrap();
    let (ok, _, err) = fcgpu(&["prompt", "--model", m, "--messages", f, "--tools", tools.to_str().unwrap()]);
    assert!(!ok && err.contains("never reads `tools`") && err.contains("chat_template.jinja"), "{err}");
    // A BFCL entry in the model's template.
    let bfcl = root().join("tests/data/bfcl/v4");
    let (ok, entry, err) =
        fcgpu(&["prompt", "--bfcl-dir", bfcl.to_str().unwrap(), "--id", "simple_python_2", "--model", m]);
    assert!(ok, "{err}");
    let s = bfcl_sample("simple_python_2");
    let t = ChatTemplate::load(&model).unwrap();
    assert_eq!(entry, render_prompt_with(Some(&t), &s, PromptStyle::Bfcl).unwrap());
    // Bad input: not JSON, and a model without a template.
    std::fs::write(&file, "[{").unwrap();
    let (ok, _, err) = fcgpu(&["prompt", "--model", m, "--messages", f]);
    assert!(!ok && err.contains("chat.json"), "{err}");
}

/// A forced call opens as the template writes an assistant's call, even in a template that
/// requires a system message first.
#[test]
fn forced_calls_follow_the_templates_own_call_syntax() {
    let src = "{% if messages[0].role != 'system' %}{{ raise_exception('system first') }}{% endif %}\
        {% if tools %}{{ tools | length }} tools{% endif %}\
        {% for m in messages %}<{{ m.role }}>{% for c in m.tool_calls or [] %}<call name='{{ c.function.name }}' args={{ c.function.arguments | tojson }}/>{% endfor %}{{ m.content }}{% endfor %}\
        {% if add_generation_prompt %}<assistant>{% endif %}";
    let t = ChatTemplate::from_source(src, "calls.jinja", &[]).unwrap();
    let f = ChatFormat::Template(std::sync::Arc::new(t));
    assert_eq!(f.forced_call(Some("add")).unwrap(), ("<call name='add' args=".to_string(), None));
    assert_eq!(f.forced_call(None).unwrap(), ("<call name='".to_string(), None));
}

/// A template file that is a FIFO, a device or far too large is refused by name, never read
/// forever (issue 27: model files are capped and must be regular files).
#[test]
fn template_files_that_are_fifos_devices_or_huge_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("chat_template.jinja");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let e = ChatTemplate::find(dir.path()).err().expect("a FIFO template is refused").to_string();
    assert!(e.contains("chat_template.jinja") && e.contains("not a regular file"), "{e}");
    std::fs::remove_file(&fifo).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &fifo).unwrap();
    let e = ChatTemplate::find(dir.path()).err().expect("/dev/zero is refused").to_string();
    assert!(e.contains("not a regular file"), "{e}");
    std::fs::remove_file(&fifo).unwrap();
    let f = std::fs::File::create(&fifo).unwrap();
    f.set_len(1 << 30).unwrap(); // sparse: 1 GiB on paper, nothing on disk
    let e = ChatTemplate::find(dir.path()).err().expect("a 1 GiB template is refused").to_string();
    assert!(e.contains("bytes"), "{e}");
}
