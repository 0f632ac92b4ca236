//! The whole path on top of the capture lab: certificates from the gateway's
//! `certs` command, the seed's resources, an OpenAI-compatible HTTPS
//! provider answering as dashscope.aliyuncs.com in the "internet", the
//! egress gateway in its own namespace, and the agent tunnelling to it.

use std::{path::PathBuf, time::Duration};

use crate::{
    env,
    gateway_lab::{
        examples_dir, gateway_run_args, issue_certs, provider_requests, spawn_provider, write_atomically,
        SEED_FILES,
    },
    process::{wait_for, Daemon, Place},
    topology::{CaptureLab, LLM_V4},
};

impl CaptureLab {
    pub fn certs(&self) -> PathBuf {
        self.workdir.path().join("certs")
    }

    /// The gateway's watched resource directory (the agent reads its routes too).
    pub fn config(&self) -> PathBuf {
        self.workdir.path().join("config")
    }

    /// Issues certificates, starts provider and gateway, and (re)starts the
    /// agent in tunnel mode.
    pub fn start_mesh(&mut self) {
        issue_certs(&self.certs(), &["default/sleep"], &[]);
        std::fs::create_dir_all(self.config()).unwrap();
        for f in SEED_FILES {
            std::fs::copy(examples_dir().join(f), self.config().join(f)).unwrap();
        }
        self.start_provider();
        self.start_gateway();
        self.stop_agent();
        self.tunnel = true;
        self.start_agent();
    }

    pub fn start_provider(&mut self) {
        let place = Place {
            netns: Some(&self.internet),
            cgroup: None,
        };
        let p = spawn_provider(
            &place,
            &format!("{LLM_V4}:443"),
            &self.certs(),
            self.workdir.path(),
            &self.api_key,
            &self.provider_extra,
        );
        self.provider = Some(p);
    }

    pub fn gateway_args(&self) -> Vec<String> {
        let mut args = gateway_run_args(&self.certs(), &self.config(), "0.0.0.0:15008", "127.0.0.1:15020");
        args.extend(self.gateway_extra.iter().cloned());
        args
    }

    pub fn start_gateway(&mut self) {
        let g = Daemon::start_with_env(
            "gateway",
            &Place {
                netns: Some(&self.gw),
                cgroup: None,
            },
            &env::gateway_bin(),
            &self.gateway_args(),
            &[("API_KEY", self.api_key.as_str())],
            self.workdir.path(),
        );
        self.gateway = Some(g);
        // Ready when its admin endpoint answers (whatever the log level).
        wait_for("the gateway", Duration::from_secs(15), || {
            if let Some(g) = self.gateway.as_mut() {
                g.assert_running();
            }
            let out = self.curl_in(&self.gw, None, &["-sf", "http://127.0.0.1:15020/healthz"]);
            out.status.success().then_some(())
        });
    }

    pub fn stop_gateway(&mut self) {
        if let Some(mut g) = self.gateway.take() {
            g.stop();
        }
    }

    /// The gateway's `/metrics`, read in its namespace.
    pub fn gateway_metrics(&self) -> String {
        let out = self.curl_in(&self.gw, None, &["-sS", "http://127.0.0.1:15020/metrics"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn gateway_logs(&self) -> String {
        self.gateway.as_ref().map(|g| g.logs()).unwrap_or_else(|| {
            std::fs::read_to_string(self.workdir.path().join("gateway.log")).unwrap_or_default()
        })
    }

    pub fn provider_requests(&self) -> Vec<serde_json::Value> {
        provider_requests(self.workdir.path())
    }

    /// Writes a resource into the gateway's watched directory.
    pub fn apply(&self, name: &str, yaml: &str) {
        write_atomically(&self.config().join(name), yaml);
    }

    pub fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.config().join(name));
    }

    /// The seed's Step 4 curl, run in the pod's namespace and `cgroup`, with
    /// extra curl arguments. Returns (exit code, stdout, stderr).
    pub fn seed_curl(&self, cgroup: &std::path::Path, extra: &[&str]) -> (Option<i32>, String, String) {
        let mut args = vec![
            "-sS",
            "--location",
            "http://dashscope.aliyuncs.com",
            "--header",
            "Content-Type: application/json",
            "--data",
            crate::gateway_lab::SEED_BODY,
        ];
        args.extend_from_slice(extra);
        let out = self.curl_in(&self.pod, Some(cgroup), &args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}
