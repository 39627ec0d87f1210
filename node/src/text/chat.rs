//! [`ChatTemplate`]: a model folder's Jinja chat template, rendered the way `transformers`'
//! `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` renders it.
//!
//! Like `transformers`: `trim_blocks` and `lstrip_blocks` on, a single trailing newline of
//! the template dropped, `loop_controls` (`break`, `continue`), Python's string, list and
//! dict methods (`.strip()`, `.startswith()`, `.split()`, `.items()`, ...; minijinja-contrib's
//! `pycompat`), `raise_exception(message)` (an error carrying the message), and a `tojson`
//! filter that writes what Python's `json.dumps(..., ensure_ascii=False)` writes. The
//! template sees `messages`, `add_generation_prompt` and the special tokens that are set
//! (`bos_token`, `eos_token`, `unk_token`, `pad_token`).
//!
//! A template is code from the model folder: rendering is bounded in work (minijinja's
//! fuel) and output size ([`RenderLimits`]), so one that loops forever or explodes is an
//! error, not a hang. What neither bounds: a value built up without being written out
//! (a string doubled in a `namespace` a few dozen times) grows in memory until fuel runs
//! out; minijinja caps `'x' * n` at 100 MB but not concatenation. Serve templates from
//! folders you chose.

use super::{one_line, read_json, read_limited, SpecialTokens, TextError, MAX_TEMPLATE};
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` (or whatever the template knows).
    pub role: String,
    /// The text.
    pub content: String,
}

/// Bounds on rendering a template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RenderLimits {
    /// minijinja fuel (roughly, instructions executed) one rendering may use. A real
    /// template spends a few hundred per message. Default: 5,000,000.
    pub fuel: u64,
    /// Largest rendered prompt in bytes. Default: 4 MiB.
    pub max_output: usize,
}

impl Default for RenderLimits {
    fn default() -> Self {
        RenderLimits {
            fuel: 5_000_000,
            max_output: 4 << 20,
        }
    }
}

/// A compiled chat template with the special tokens it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    path: PathBuf,
    special: SpecialTokens,
    limits: RenderLimits,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("path", &self.path)
            .field("special", &self.special)
            .field("limits", &self.limits)
            .finish()
    }
}

/// The name the template is compiled under (error messages name the file instead).
const NAME: &str = "chat_template";

/// The error `raise_exception` raises: its message.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Raised(String);

impl ChatTemplate {
    /// The chat template of model folder `dir`: `chat_template.jinja` when present (at
    /// most [`MAX_TEMPLATE`] bytes), else `chat_template` in `tokenizer_config.json` (a
    /// string, or a list of `{"name", "template"}` of which `default` is used), rendered
    /// with that file's special tokens and the default [`RenderLimits`].
    pub fn load(dir: &Path) -> Result<ChatTemplate, TextError> {
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?;
        let special = match &config {
            Some(c) => SpecialTokens::from_config(c, &config_path)?,
            None => SpecialTokens::default(),
        };
        let file = dir.join("chat_template.jinja");
        if file.exists() {
            let bytes = read_limited(&file, MAX_TEMPLATE)?;
            let source = String::from_utf8(bytes).map_err(|_| TextError::Malformed {
                path: file.clone(),
                reason: "not UTF-8".into(),
            })?;
            return ChatTemplate::from_source(&source, &file, special);
        }
        let source = match config.as_ref().and_then(|c| c.get("chat_template")) {
            None | Some(serde_json::Value::Null) => {
                return Err(TextError::NoTemplate {
                    dir: dir.to_path_buf(),
                })
            }
            Some(v) => template_in_config(v, &config_path)?,
        };
        if source.len() as u64 > MAX_TEMPLATE {
            return Err(TextError::Template {
                path: config_path,
                reason: format!("larger than the limit of {MAX_TEMPLATE} bytes"),
            });
        }
        ChatTemplate::from_source(&source, &config_path, special)
    }

    /// Compiles template `source` (from file `path`, which errors name) with the special
    /// tokens `special` and the default [`RenderLimits`].
    pub fn from_source(
        source: &str,
        path: &Path,
        special: SpecialTokens,
    ) -> Result<ChatTemplate, TextError> {
        let limits = RenderLimits::default();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(limits.fuel));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message.clone())
                    .with_source(Raised(message)))
            },
        );
        env.add_filter("tojson", tojson);
        env.add_function("strftime_now", |format: String| -> Result<Value, Error> {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            strftime(&format, now)
                .map(Value::from)
                .map_err(|e| Error::new(ErrorKind::InvalidOperation, e))
        });
        // Jinja2 reads every line break of a template (in its text and its string
        // literals alike) as `\n`.
        let source = source.replace("\r\n", "\n").replace('\r', "\n");
        env.add_template_owned(NAME, source)
            .map_err(|e| TextError::Template {
                path: path.to_path_buf(),
                reason: describe(&e),
            })?;
        Ok(ChatTemplate {
            env,
            path: path.to_path_buf(),
            special,
            limits,
        })
    }

    /// The same template with other limits.
    pub fn with_limits(mut self, limits: RenderLimits) -> ChatTemplate {
        self.env.set_fuel(Some(limits.fuel));
        self.limits = limits;
        self
    }

    /// The file the template came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The special tokens it is rendered with.
    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }

    /// Renders `messages` (each serialised as the template sees it, e.g. a
    /// [`ChatMessage`]) into a prompt; with `add_generation_prompt` the prompt ends where
    /// the assistant's answer starts.
    pub fn render<M: Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
    ) -> Result<String, TextError> {
        self.render_with(
            messages,
            add_generation_prompt,
            &BTreeMap::<String, Value>::new(),
        )
    }

    /// [`render`](Self::render) with more variables for the template (`tools`,
    /// `date_string`, `enable_thinking`, ...: what `apply_chat_template`'s keyword
    /// arguments give): `extra` serialises to a map; its entries take precedence over the
    /// special tokens, as keyword arguments do in `transformers`. `tojson` writes maps in
    /// their order: pass a [`minijinja::Value`] (deserialised from JSON, it keeps the order)
    /// rather than a `serde_json::Value`, whose maps sort their keys.
    pub fn render_with<M: Serialize, E: Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
        extra: &E,
    ) -> Result<String, TextError> {
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        let tokens = [
            ("bos_token", &self.special.bos),
            ("eos_token", &self.special.eos),
            ("unk_token", &self.special.unk),
            ("pad_token", &self.special.pad),
        ];
        for (name, token) in tokens {
            if let Some(t) = token {
                ctx.insert(name.into(), Value::from(t.as_str()));
            }
        }
        let extra = Value::from_serialize(extra);
        if extra.kind() != ValueKind::Map {
            return Err(TextError::Template {
                path: self.path.clone(),
                reason: "the extra variables are not a map".into(),
            });
        }
        for k in extra.try_iter().into_iter().flatten() {
            if let (Some(name), Ok(v)) = (k.as_str(), extra.get_item(&k)) {
                ctx.insert(name.to_string(), v);
            }
        }
        ctx.insert("messages".into(), Value::from_serialize(messages));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        let error = |reason: String| TextError::Template {
            path: self.path.clone(),
            reason,
        };
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| error(describe(&e)))?;
        let mut out = Bounded {
            buf: Vec::new(),
            max: self.limits.max_output,
            overflowed: false,
        };
        if let Err(e) = tmpl.render_captured_to(&ctx, &mut out) {
            return Err(error(if out.overflowed {
                format!(
                    "the rendered prompt is larger than the limit of {} bytes",
                    self.limits.max_output
                )
            } else if e.kind() == ErrorKind::OutOfFuel {
                format!(
                    "rendering ran out of fuel ({} units): the template does too much work",
                    self.limits.fuel
                )
            } else {
                describe(&e)
            }));
        }
        String::from_utf8(out.buf).map_err(|_| error("the rendered prompt is not UTF-8".into()))
    }
}

/// The template source of `tokenizer_config.json`'s `chat_template` value `v`.
pub(super) fn template_in_config(v: &serde_json::Value, path: &Path) -> Result<String, TextError> {
    let bad = |reason: &str| TextError::Malformed {
        path: path.to_path_buf(),
        reason: reason.into(),
    };
    match v {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Array(list) => {
            let named =
                |t: &&serde_json::Value| t.get("name").and_then(|n| n.as_str()) == Some("default");
            let t = list.iter().find(named).ok_or_else(|| {
                bad("`chat_template` is a list without a template named `default`")
            })?;
            t.get("template")
                .and_then(|s| s.as_str())
                .map(str::to_string)
                .ok_or_else(|| bad("`chat_template` `default` has no string `template`"))
        }
        _ => Err(bad(
            "`chat_template` is neither a string nor a list of named templates",
        )),
    }
}

/// One line saying what went wrong: the template's own message when it raised, else
/// minijinja's (with the line).
fn describe(e: &Error) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(Raised(m)) = s.downcast_ref::<Raised>() {
            return format!("raise_exception: {}", one_line(m));
        }
        source = s.source();
    }
    let line = e.line().map(|l| format!(" (line {l})")).unwrap_or_default();
    let detail = e.detail().map(|d| format!(": {d}")).unwrap_or_default();
    one_line(format!("{}{detail}{line}", e.kind()))
}

/// `format` applied to the UTC time `secs` seconds after the Unix epoch, as Python's
/// `strftime` does for the directives chat templates use: `%Y %y %m %d %e %B %b %A %a %H
/// %I %p %M %S %j %%`; any other is an error. (`transformers`' `strftime_now` uses local
/// time; a node's chat prompts use UTC.)
fn strftime(format: &str, secs: i64) -> Result<String, String> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let t = secs.rem_euclid(86_400);
    let (hour, minute, second) = (t / 3600, t % 3600 / 60, t % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let day = doy_mar - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let before = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334][month as usize - 1];
    let yday = before + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let d = chars.next().ok_or("strftime_now: a format ending in %")?;
        let month_name = MONTHS[month as usize - 1];
        let piece = match d {
            'Y' => year.to_string(),
            'y' => format!("{:02}", year.rem_euclid(100)),
            'm' => format!("{month:02}"),
            'd' => format!("{day:02}"),
            'e' => format!("{day:2}"),
            'B' => month_name.to_string(),
            'b' => month_name[..3].to_string(),
            'A' => DAYS[weekday].to_string(),
            'a' => DAYS[weekday][..3].to_string(),
            'H' => format!("{hour:02}"),
            'I' => format!("{:02}", (hour + 11) % 12 + 1),
            'p' => (if hour < 12 { "AM" } else { "PM" }).to_string(),
            'M' => format!("{minute:02}"),
            'S' => format!("{second:02}"),
            'j' => format!("{yday:03}"),
            '%' => "%".to_string(),
            other => return Err(format!("strftime_now: unsupported directive %{other}")),
        };
        out.push_str(&piece);
    }
    Ok(out)
}

/// Collects the rendered output, failing the write past `max` bytes.
struct Bounded {
    buf: Vec<u8>,
    max: usize,
    overflowed: bool,
}

impl std::io::Write for Bounded {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.max {
            self.overflowed = true;
            return Err(std::io::Error::other("output limit"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The `tojson` filter `transformers` gives templates: Python's `json.dumps(value,
/// ensure_ascii=False, indent=indent, sort_keys=sort_keys)` (separators `", "` and `": "`,
/// or `","` and `": "` with an indent); `indent` and `sort_keys` default to none and false.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, indent, sort_keys.unwrap_or(false), 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    out: &mut String,
    v: &Value,
    indent: Option<usize>,
    sort_keys: bool,
    depth: usize,
) -> Result<(), Error> {
    if depth > 64 {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "tojson: nested too deeply",
        ));
    }
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let (open, close, items): (char, char, Vec<(Option<String>, Value)>) = match v.kind() {
        ValueKind::Undefined | ValueKind::None => {
            out.push_str("null");
            return Ok(());
        }
        ValueKind::Bool => {
            out.push_str(if v.is_true() { "true" } else { "false" });
            return Ok(());
        }
        ValueKind::Number => {
            out.push_str(&v.to_string());
            return Ok(());
        }
        ValueKind::String | ValueKind::Bytes | ValueKind::Invalid | ValueKind::Plain => {
            out.push_str(&quote(v.as_str().unwrap_or(&v.to_string())));
            return Ok(());
        }
        ValueKind::Map => {
            let mut kv = Vec::new();
            for k in v.try_iter()? {
                let val = v.get_item(&k)?;
                kv.push((
                    Some(k.as_str().map(str::to_string).unwrap_or(k.to_string())),
                    val,
                ));
            }
            if sort_keys {
                kv.sort_by(|a, b| a.0.cmp(&b.0));
            }
            ('{', '}', kv)
        }
        _ => ('[', ']', v.try_iter()?.map(|x| (None, x)).collect()),
    };
    out.push(open);
    for (i, (k, x)) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
            if indent.is_none() {
                out.push(' ');
            }
        }
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * (depth + 1)));
        }
        if let Some(k) = k {
            out.push_str(&quote(k));
            out.push_str(": ");
        }
        write_json(out, x, indent, sort_keys, depth + 1)?;
    }
    if let (Some(n), false) = (indent, items.is_empty()) {
        out.push('\n');
        out.push_str(&" ".repeat(n * depth));
    }
    out.push(close);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpl(src: &str) -> ChatTemplate {
        let special = SpecialTokens {
            bos: Some("<s>".into()),
            eos: Some("</s>".into()),
            ..Default::default()
        };
        ChatTemplate::from_source(src, Path::new("dir/tokenizer_config.json"), special).unwrap()
    }

    fn msgs() -> Vec<ChatMessage> {
        vec![ChatMessage {
            role: "user".into(),
            content: "  hi there  ".into(),
        }]
    }

    #[test]
    fn python_string_methods_and_special_tokens() {
        let t = tmpl(
            "{{ bos_token }}{% for m in messages %}[{{ m.content.strip() }}|{{ m.role.startswith('us') }}|{{ m.content.split() | join(',') }}]{% endfor %}{% if add_generation_prompt %}A:{% endif %}{{ eos_token }}",
        );
        assert_eq!(
            t.render(&msgs(), true).unwrap(),
            "<s>[hi there|True|hi,there]A:</s>"
        );
        assert_eq!(
            t.render(&msgs(), false).unwrap(),
            "<s>[hi there|True|hi,there]</s>"
        );
    }

    /// What Python's Jinja2 gives: `x\r-y\na\nb\nc` (the literal `\r\n` is read as `\n`).
    #[test]
    fn line_breaks_in_the_source_are_newlines() {
        let t = tmpl("{{ messages[0].content.replace('\r\n', '-') }}\r\n{{ 'a\r\nb\rc' }}");
        let m = vec![ChatMessage {
            role: "user".into(),
            content: "x\r\ny".into(),
        }];
        assert_eq!(t.render(&m, false).unwrap(), "x\r-y\na\nb\nc");
    }

    #[test]
    fn raise_exception_is_an_error_with_its_message() {
        let t = tmpl(
            "{% if messages | length < 2 %}{{ raise_exception('need two\nmessages') }}{% endif %}",
        );
        let e = t.render(&msgs(), true).unwrap_err().to_string();
        assert_eq!(
            e,
            "dir/tokenizer_config.json: chat template: raise_exception: need two messages"
        );
    }

    #[test]
    fn endless_or_exploding_templates_are_errors() {
        let forever = tmpl(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        );
        let e = forever.render(&msgs(), true).unwrap_err().to_string();
        assert!(e.contains("out of fuel"), "{e}");
        let big = tmpl("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}");
        let e = big
            .with_limits(RenderLimits {
                fuel: 100_000_000,
                max_output: 1 << 20,
            })
            .render(&msgs(), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("larger than the limit of 1048576 bytes"), "{e}");
        let broken =
            ChatTemplate::from_source("{% for %}", Path::new("t.jinja"), Default::default());
        let e = broken.unwrap_err().to_string();
        assert!(e.starts_with("t.jinja: chat template: syntax error"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn tojson_writes_what_python_writes() {
        let t = tmpl("{{ messages | tojson }}|{{ {'b': [1, 2.5, none, true], 'a': 'é<'} | tojson(indent=2, sort_keys=true) }}");
        assert_eq!(
            t.render(&msgs(), false).unwrap(),
            "[{\"role\": \"user\", \"content\": \"  hi there  \"}]|{\n  \"a\": \"é<\",\n  \"b\": [\n    1,\n    2.5,\n    null,\n    true\n  ]\n}"
        );
    }

    #[test]
    fn strftime_formats_like_python() {
        // 2024-07-26 13:25:09 UTC, a Friday; 2000-02-29 (leap), a Tuesday; the epoch.
        let f = "%d %b %Y|%e %B %y|%A %a|%H:%M:%S %I%p|%j|%m|%%";
        assert_eq!(
            strftime(f, 1_722_000_309).unwrap(),
            "26 Jul 2024|26 July 24|Friday Fri|13:25:09 01PM|208|07|%"
        );
        assert_eq!(
            strftime("%Y-%m-%d %a %j", 951_782_400).unwrap(),
            "2000-02-29 Tue 060"
        );
        assert_eq!(
            strftime("%Y-%m-%d %A %I%p", 0).unwrap(),
            "1970-01-01 Thursday 12AM"
        );
        assert!(strftime("%Q", 0).is_err());
        assert!(
            tmpl("{{ strftime_now('%Y') }}")
                .render(&msgs(), true)
                .unwrap()
                .len()
                == 4
        );
    }

    #[test]
    fn named_templates_use_default() {
        let p = Path::new("tokenizer_config.json");
        let v = serde_json::json!([{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]);
        assert_eq!(template_in_config(&v, p).unwrap(), "D");
        let v = serde_json::json!([{"name": "tool_use", "template": "T"}]);
        assert!(template_in_config(&v, p).is_err());
        assert!(template_in_config(&serde_json::json!(3), p).is_err());
    }
}
