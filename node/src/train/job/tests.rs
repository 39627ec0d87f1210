//! Job files: parsing, defaults, and every check naming its key.

use super::*;

const MIN: &str = r#"
name = "t"
steps = 10
batch_size = 8
[model]
kind = "mlp"
[data]
kind = "csv"
path = "d.csv"
"#;

#[test]
fn minimal_job_parses_with_defaults() {
    let j = JobSpec::parse(MIN).unwrap();
    assert_eq!(j.seed, 1);
    assert_eq!(j.optimizer.kind, OptimizerKind::Adamw);
    assert_eq!(j.model.hidden, vec![128]);
    assert_eq!(j.run_dir(), PathBuf::from("runs/t"));
    // Round trip through the announced form.
    assert_eq!(JobSpec::parse(&j.to_toml()).unwrap(), j);
}

fn err(text: &str) -> String {
    JobSpec::parse(text).unwrap_err().to_string()
}

#[test]
fn errors_name_the_key() {
    assert!(err(&MIN.replace("steps = 10", "steps = 0")).contains("`steps`"));
    assert!(err(&MIN.replace("steps = 10", "")).contains("`steps` is missing"));
    assert!(err(&MIN.replace("batch_size = 8", "batch_size = 0")).contains("`batch_size`"));
    assert!(err(&MIN.replace("path = \"d.csv\"", "")).contains("`data.path`"));
    assert!(err(&MIN.replace("kind = \"mlp\"", "kind = \"gpt\"")).contains("`model.kind`"));
    assert!(err(&format!("{MIN}[optimizer]\nlr = -1\n")).contains("`optimizer.lr`"));
    let unknown = err(&MIN.replace("steps = 10", "steps = 10\nstepz = 3"));
    assert!(unknown.contains("stepz"), "{unknown}");
    let wrong_type = err(&MIN.replace("steps = 10", "steps = \"ten\""));
    assert!(wrong_type.contains("steps"), "{wrong_type}");
    assert!(err(&MIN.replace("name = \"t\"", "name = \"../x\"")).contains("`name`"));
    assert!(err(&"#".repeat(MAX_JOB_BYTES + 1)).contains("limit"));
}

#[test]
fn gpt_context_must_hold_a_sum() {
    let text = r#"
name = "a"
steps = 1
batch_size = 4
[model]
kind = "gpt"
context = 8
[data]
kind = "arithmetic"
digits = 2
"#;
    assert!(err(text).contains("`model.context` must be at least 9"));
}

#[test]
fn schedules() {
    let mut j = JobSpec::parse(MIN).unwrap();
    j.optimizer.warmup_steps = 10;
    assert!((j.lr_at(0, 110) - j.optimizer.lr / 10.0).abs() < 1e-12);
    assert!((j.lr_at(10, 110) - j.optimizer.lr).abs() < 1e-12);
    assert!(j.lr_at(109, 110) < j.optimizer.lr * 0.01);
    j.optimizer.schedule = Schedule::Constant;
    assert_eq!(j.lr_at(100, 110), j.optimizer.lr);
}

#[test]
fn lm_data_keys() {
    let gpt = MIN.replace("kind = \"mlp\"", "kind = \"gpt\"");
    let jsonl = gpt.replace(
        "kind = \"csv\"\npath = \"d.csv\"",
        "kind = \"jsonl\"\nfiles = \"shards/*.jsonl\"",
    );
    let j = JobSpec::parse(&jsonl).unwrap();
    assert_eq!(j.data.text_field, "text");
    assert_eq!(j.data.messages_field, None);
    assert!(err(&jsonl.replace("files = \"shards/*.jsonl\"", "")).contains("`data.files`"));
    assert!(err(&format!("{jsonl}messages_field = \"m\"\n")).contains("`data.messages_field`"));
    assert!(err(&format!("{jsonl}text_field = \"\"\n")).contains("`data.text_field`"));
    let parquet = jsonl.replace("jsonl", "parquet");
    assert!(JobSpec::parse(&parquet).is_ok());
    assert!(err(&parquet.replace("kind = \"gpt\"", "kind = \"mlp\"")).contains("`model.kind`"));
    let mut j = JobSpec::parse(&parquet).unwrap();
    j.resolve_paths(Path::new("/jobs"), Path::new("/work"));
    assert_eq!(
        j.data.files.as_deref(),
        Some(Path::new("/jobs/shards/*.parquet"))
    );
}

#[test]
fn relative_paths_resolve_against_the_job_dir() {
    let mut j = JobSpec::parse(MIN).unwrap();
    j.resolve_paths(Path::new("/jobs"), Path::new("/work"));
    assert_eq!(j.data.path.as_deref(), Some(Path::new("/jobs/d.csv")));
    assert_eq!(j.output_dir, PathBuf::from("/work/runs"));
    // A model folder too (an absolute one stays).
    let hf = MIN.replace("kind = \"mlp\"", "hf = \"out/model\"").replace(
        "kind = \"csv\"\npath = \"d.csv\"",
        "kind = \"text\"\npath = \"/d.txt\"",
    );
    let mut j = JobSpec::parse(&hf).unwrap();
    j.resolve_paths(Path::new("/jobs"), Path::new("/work"));
    assert_eq!(j.model.hf.as_deref(), Some(Path::new("/jobs/out/model")));
    assert_eq!(j.data.path.as_deref(), Some(Path::new("/d.txt")));
}
