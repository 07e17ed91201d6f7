//! Judge backends: any OpenAI-compatible chat endpoint (vLLM, SGLang, `fcgpu serve`) over
//! HTTP, N requests in flight, or a local model through fcgpu's own rollout engine.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value as Json};

/// One judge request: a single user turn.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: String,
    pub temperature: f32,
    pub seed: u64,
}

/// The judge's text, or why there is none (a 4xx, or failures past the retries).
pub type Answer = Result<String, String>;

pub trait Backend {
    /// The model name, part of every cache key.
    fn model(&self) -> &str;
    /// Answers every request; `done(i, answer)` is called as each arrives (to cache it).
    fn complete(&self, reqs: &[Request], done: &(dyn Fn(usize, &Answer) + Sync)) -> Vec<Answer>;
}

/// An OpenAI-compatible endpoint.
pub struct Http {
    pub url: String,
    pub model: String,
    pub concurrency: usize,
    pub max_tokens: usize,
    /// Retries after a timeout, a transport error, a 5xx, a 408 or a 429.
    pub retries: u32,
    /// First backoff; doubled after each retry.
    pub backoff: Duration,
    pub api_key: Option<String>,
    agent: ureq::Agent,
}

impl Http {
    /// `url` is the API base (`http://host:port/v1`) or the full chat-completions URL.
    pub fn new(url: &str, model: &str, timeout: Duration) -> Http {
        let url = url.trim_end_matches('/');
        let url = if url.ends_with("/chat/completions") {
            url.to_string()
        } else {
            format!("{url}/chat/completions")
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Http {
            url,
            model: model.to_string(),
            concurrency: 8,
            max_tokens: 1024,
            retries: 4,
            backoff: Duration::from_millis(500),
            api_key: None,
            agent,
        }
    }

    fn post(&self, body: &Json) -> Result<(u16, String), String> {
        let mut req = self.agent.post(&self.url).header("Content-Type", "application/json");
        if let Some(k) = &self.api_key {
            req = req.header("Authorization", &format!("Bearer {k}"));
        }
        let mut resp = req.send(body.to_string()).map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().map_err(|e| e.to_string())?;
        Ok((status, text))
    }

    /// One request with retries and exponential backoff; a 4xx other than 408/429 is final.
    fn one(&self, r: &Request) -> Answer {
        let body = json!({"model": self.model, "messages": [{"role": "user", "content": r.prompt}],
            "temperature": r.temperature, "seed": r.seed, "max_tokens": self.max_tokens});
        let mut delay = self.backoff;
        let mut last = String::new();
        for attempt in 0..=self.retries {
            if attempt > 0 {
                std::thread::sleep(delay);
                delay *= 2;
            }
            match self.post(&body) {
                Ok((s, text)) if s < 300 => return content(&text),
                Ok((s, text)) if (400..500).contains(&s) && s != 408 && s != 429 => {
                    return Err(format!("{}: HTTP {s}: {}", self.url, clip(&text)))
                }
                Ok((s, text)) => last = format!("HTTP {s}: {}", clip(&text)),
                Err(e) => last = e,
            }
        }
        Err(format!("{}: {last} (after {} tries)", self.url, self.retries + 1))
    }
}

fn clip(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The answer text of a chat completion; a reasoning parser's `reasoning_content` is put back
/// in front, inside `<think>`, as the judge wrote it.
fn content(body: &str) -> Answer {
    let v: Json =
        serde_json::from_str(body).map_err(|e| format!("response is not JSON ({e}): {}", clip(body)))?;
    let msg = &v["choices"][0]["message"];
    let text = msg["content"].as_str();
    let reasoning = msg["reasoning_content"].as_str().filter(|r| !r.is_empty());
    match (reasoning, text) {
        (Some(r), t) => Ok(format!("<think>{r}</think>{}", t.unwrap_or_default())),
        (None, Some(t)) => Ok(t.to_string()),
        (None, None) => Err(format!("response without choices[0].message.content: {}", clip(body))),
    }
}

impl Backend for Http {
    fn model(&self) -> &str {
        &self.model
    }

    fn complete(&self, reqs: &[Request], done: &(dyn Fn(usize, &Answer) + Sync)) -> Vec<Answer> {
        let next = AtomicUsize::new(0);
        let slots: Vec<std::sync::Mutex<Option<Answer>>> = reqs.iter().map(|_| Default::default()).collect();
        std::thread::scope(|s| {
            for _ in 0..self.concurrency.clamp(1, reqs.len().max(1)) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(r) = reqs.get(i) else { break };
                    let a = self.one(r);
                    done(i, &a);
                    *slots[i].lock().expect("slot") = Some(a);
                });
            }
        });
        slots.into_iter().map(|m| m.into_inner().expect("slot").expect("every request answered")).collect()
    }
}

/// A local model through the rollout engine (`--judge-local`).
pub struct Local {
    model: crate::model::Model,
    tok: crate::model::tokenizer::Tokenizer,
    name: String,
    pub max_tokens: usize,
    pub max_batch: usize,
}

impl Local {
    pub fn load(dir: &std::path::Path, device: &str) -> Result<Local> {
        let device = crate::device::Device::for_command(device, "data prepare")?;
        let mut model = crate::model::Model::load_on(dir, device, None)?;
        let tok = crate::model::tokenizer::Tokenizer::load(dir)?;
        model.config.eos_token_ids = crate::rollout::chat_eos_ids(&model, Some(&tok));
        let canon = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        let name =
            canon.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "local".into());
        Ok(Local { model, tok, name: format!("local:{name}"), max_tokens: 1024, max_batch: 32 })
    }

    /// Answers the requests that share one temperature and seed, in one batch.
    fn batch(&self, reqs: &[&Request]) -> Result<Vec<String>> {
        let format = crate::rollout::chat::ChatFormat::for_model(&self.model)?;
        let prompts: Vec<Vec<u32>> = reqs
            .iter()
            .map(|r| {
                let text = format.render(&[json!({"role": "user", "content": r.prompt})], None)?;
                self.tok.encode(&text, false)
            })
            .collect::<Result<_>>()?;
        let cfg = crate::rollout::SamplingConfig {
            max_new_tokens: self.max_tokens,
            temperature: reqs[0].temperature,
            seed: reqs[0].seed,
            max_batch: self.max_batch,
            progress: true,
            ..Default::default()
        };
        let out =
            crate::rollout::generate(&self.model, &prompts, &cfg, Some(&self.tok)).context("local judge")?;
        out.iter().map(|c| c.text(&self.tok)).collect()
    }
}

impl Backend for Local {
    fn model(&self) -> &str {
        &self.name
    }

    fn complete(&self, reqs: &[Request], done: &(dyn Fn(usize, &Answer) + Sync)) -> Vec<Answer> {
        let mut out: Vec<Option<Answer>> = vec![None; reqs.len()];
        let mut groups: Vec<((u32, u64), Vec<usize>)> = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            let k = (r.temperature.to_bits(), r.seed);
            match groups.iter_mut().find(|g| g.0 == k) {
                Some(g) => g.1.push(i),
                None => groups.push((k, vec![i])),
            }
        }
        for (_, idx) in groups {
            let batch: Vec<&Request> = idx.iter().map(|&i| &reqs[i]).collect();
            let answers: Vec<Answer> = match self.batch(&batch) {
                Ok(texts) => texts.into_iter().map(Ok).collect(),
                Err(e) => idx.iter().map(|_| Err(format!("{e:#}"))).collect(),
            };
            for (&i, a) in idx.iter().zip(answers) {
                done(i, &a);
                out[i] = Some(a);
            }
        }
        out.into_iter().map(|a| a.expect("every request answered")).collect()
    }
}
