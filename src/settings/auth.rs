//! How API calls authenticate: exactly one of a token (or token file), the
//! IAM password settings, or an AK/SK pair. Plain settings; the AOM
//! adapter's `auth` module turns them into credentials.

use super::{ConfigError, seconds, secret};
use crate::domain::ProjectId;
use clap::Args;
use secrecy::{ExposeSecret, SecretString};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The longest token accepted, in bytes.
const MAX_TOKEN: usize = 40960;

#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// Token sent as X-Auth-Token.
    #[arg(long, env = "AOM_AUTH_TOKEN", hide_env_values = true, value_parser = secret)]
    pub aom_auth_token: Option<SecretString>,
    /// File holding the token; re-read when it changes (a mounted secret).
    #[arg(long, env = "AOM_AUTH_TOKEN_FILE")]
    pub aom_auth_token_file: Option<PathBuf>,
    /// The one project the token (or token file) covers; requests for other
    /// projects are held without a call. Unset: the token is tried for all.
    #[arg(long, env = "AOM_AUTH_TOKEN_PROJECT_ID")]
    pub aom_auth_token_project_id: Option<String>,
    /// IAM endpoint, e.g. https://iam.cn-north-4.myhuaweicloud.com
    #[arg(long, env = "IAM_ENDPOINT")]
    pub iam_endpoint: Option<String>,
    /// IAM user name.
    #[arg(long, env = "IAM_USER")]
    pub iam_user: Option<String>,
    /// IAM user password.
    #[arg(long, env = "IAM_PASSWORD", hide_env_values = true, value_parser = secret)]
    pub iam_password: Option<SecretString>,
    /// IAM domain (account) name.
    #[arg(long, env = "IAM_DOMAIN")]
    pub iam_domain: Option<String>,
    /// The project (by name, e.g. cn-north-4) of the first token and of the
    /// credential check; tokens for other projects are obtained by id.
    #[arg(long, env = "IAM_PROJECT_NAME")]
    pub iam_project_name: Option<String>,
    /// The project (by id) of the first token and of the credential check.
    #[arg(long, env = "IAM_PROJECT_ID")]
    pub iam_project_id: Option<String>,
    /// Renew the IAM token when less than this is left (`1h`, `600`).
    #[arg(long, env = "IAM_RENEW_BEFORE", default_value = "1h", value_parser = seconds)]
    pub iam_renew_before: Duration,
    /// Access key for AK/SK signing.
    #[arg(long, env = "CLOUD_SDK_AK", hide_env_values = true, value_parser = secret)]
    pub cloud_sdk_ak: Option<SecretString>,
    /// Secret key for AK/SK signing.
    #[arg(long, env = "CLOUD_SDK_SK", hide_env_values = true, value_parser = secret)]
    pub cloud_sdk_sk: Option<SecretString>,
    /// Security token of temporary AK/SK credentials (sent as X-Security-Token).
    #[arg(long, env = "CLOUD_SDK_SECURITY_TOKEN", hide_env_values = true, value_parser = secret)]
    pub cloud_sdk_security_token: Option<SecretString>,
    #[arg(long, env = "HUAWEICLOUD_SDK_AK", hide = true, value_parser = secret)]
    pub huaweicloud_sdk_ak: Option<SecretString>,
    #[arg(long, env = "HUAWEICLOUD_SDK_SK", hide = true, value_parser = secret)]
    pub huaweicloud_sdk_sk: Option<SecretString>,
    #[arg(long, env = "HUAWEICLOUD_SDK_SECURITY_TOKEN", hide = true, value_parser = secret)]
    pub huaweicloud_sdk_security_token: Option<SecretString>,
}

/// How the daemon authenticates: exactly one mode.
#[derive(Debug, Clone)]
pub enum AuthSettings {
    Token(StaticToken<SecretString>),
    TokenFile(StaticToken<PathBuf>),
    Iam(IamSettings),
    AkSk(AkSkSettings),
}

/// A static token (its value, or the file holding it) and the one project it
/// covers, when declared (`AOM_AUTH_TOKEN_PROJECT_ID`).
#[derive(Debug, Clone)]
pub struct StaticToken<T> {
    pub token: T,
    /// `None`: the token is tried for every project.
    pub project: Option<ProjectId>,
}

impl<T> StaticToken<T> {
    /// A token declared for no project in particular.
    pub fn any_project(token: T) -> Self {
        Self {
            token,
            project: None,
        }
    }
}

impl From<String> for StaticToken<SecretString> {
    fn from(token: String) -> Self {
        Self::any_project(SecretString::from(token))
    }
}

impl AuthSettings {
    pub fn mode(&self) -> &'static str {
        match self {
            AuthSettings::Token(_) => "token",
            AuthSettings::TokenFile(_) => "token file",
            AuthSettings::Iam(_) => "IAM password",
            AuthSettings::AkSk(_) => "AK/SK signing",
        }
    }
}

/// AK/SK credentials. `Debug` shows the access key only.
#[derive(Clone)]
pub struct AkSkSettings {
    pub access_key: String,
    pub secret_key: SecretString,
    pub security_token: Option<SecretString>,
}

impl std::fmt::Debug for AkSkSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AkSkSettings")
            .field("access_key", &self.access_key)
            .field("temporary", &self.security_token.is_some())
            .finish_non_exhaustive()
    }
}

/// IAM password authentication. `Debug` hides the password.
#[derive(Clone)]
pub struct IamSettings {
    pub endpoint: url::Url,
    pub user: String,
    pub password: SecretString,
    pub domain: String,
    /// The project of the first token and of the credential check
    /// (`IAM_PROJECT_NAME`/`IAM_PROJECT_ID`); any project gets its own token.
    pub home: Option<ProjectScope>,
    /// Renew when less than this is left (at most half the token's life).
    pub renew_before: Duration,
}

impl std::fmt::Debug for IamSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IamSettings")
            .field("endpoint", &self.endpoint.as_str())
            .field("user", &self.user)
            .field("domain", &self.domain)
            .field("home", &self.home)
            .field("renew_before", &self.renew_before)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProjectScope {
    Name(String),
    Id(String),
}

/// Why `token` cannot be sent as a header value, if it cannot: the rule
/// HTTP header values follow (visible characters, space and tab).
pub fn token_problem(token: &str) -> Option<String> {
    if token.is_empty() || token.len() > MAX_TOKEN {
        return Some(format!("the token must be 1..{MAX_TOKEN} characters"));
    }
    let valid = |b: u8| b == b'\t' || (b >= 0x20 && b != 0x7f);
    (!token.bytes().all(valid)).then(|| "contains characters not allowed in a header".to_owned())
}

/// The token held in `path`, trimmed and checked.
pub fn read_token_file(path: &Path) -> Result<SecretString, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let token = text.trim();
    match token_problem(token) {
        Some(problem) => Err(problem),
        None => Ok(SecretString::from(token)),
    }
}

/// An http(s) URL with a host, or `None`.
pub fn http_url(s: &str) -> Option<url::Url> {
    match url::Url::parse(s) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Some(u),
        _ => None,
    }
}

impl AuthArgs {
    pub fn validate(&self) -> Result<AuthSettings, ConfigError> {
        let err = |s: String| Err(ConfigError(s));
        let ak = self
            .cloud_sdk_ak
            .as_ref()
            .or(self.huaweicloud_sdk_ak.as_ref());
        let sk = self
            .cloud_sdk_sk
            .as_ref()
            .or(self.huaweicloud_sdk_sk.as_ref());
        let security_token = self
            .cloud_sdk_security_token
            .as_ref()
            .or(self.huaweicloud_sdk_security_token.as_ref());
        let iam_set = self.iam_endpoint.is_some()
            || self.iam_user.is_some()
            || self.iam_password.is_some()
            || self.iam_domain.is_some()
            || self.iam_project_name.is_some()
            || self.iam_project_id.is_some();
        let modes: Vec<&str> = [
            (self.aom_auth_token.is_some(), "AOM_AUTH_TOKEN"),
            (self.aom_auth_token_file.is_some(), "AOM_AUTH_TOKEN_FILE"),
            (iam_set, "IAM_*"),
            (
                ak.is_some() || sk.is_some() || security_token.is_some(),
                "CLOUD_SDK_AK/SK",
            ),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect();
        match modes.as_slice() {
            [] => err(
                "no authentication configured: set AOM_AUTH_TOKEN, AOM_AUTH_TOKEN_FILE, \
                 the IAM_* settings, or CLOUD_SDK_AK and CLOUD_SDK_SK"
                    .to_owned(),
            ),
            [_] => self.settings(ak, sk, security_token),
            several => err(format!(
                "conflicting authentication settings: {} are all set; configure exactly one way",
                several.join(", ")
            )),
        }
    }

    fn settings(
        &self,
        ak: Option<&SecretString>,
        sk: Option<&SecretString>,
        security_token: Option<&SecretString>,
    ) -> Result<AuthSettings, ConfigError> {
        let err = |s: &str| Err(ConfigError(s.to_owned()));
        let token_project = match self.aom_auth_token_project_id.as_deref().map(str::trim) {
            Some(id) if !id.is_empty() => Some(
                ProjectId::parse(id)
                    .map_err(|e| ConfigError(format!("AOM_AUTH_TOKEN_PROJECT_ID: {e}")))?,
            ),
            _ => None,
        };
        if token_project.is_some()
            && self.aom_auth_token.is_none()
            && self.aom_auth_token_file.is_none()
        {
            return err(
                "AOM_AUTH_TOKEN_PROJECT_ID declares the project of AOM_AUTH_TOKEN or \
                 AOM_AUTH_TOKEN_FILE; set one of them, or unset it",
            );
        }
        if let Some(token) = &self.aom_auth_token {
            if let Some(problem) = token_problem(token.expose_secret()) {
                return Err(ConfigError(format!("AOM_AUTH_TOKEN: {problem}")));
            }
            return Ok(AuthSettings::Token(StaticToken {
                token: token.clone(),
                project: token_project,
            }));
        }
        if let Some(path) = &self.aom_auth_token_file {
            // Read once now, so that a wrong path is a start-up error.
            read_token_file(path).map_err(|reason| {
                ConfigError(format!(
                    "AOM_AUTH_TOKEN_FILE: cannot read the token file {}: {reason}",
                    path.display()
                ))
            })?;
            return Ok(AuthSettings::TokenFile(StaticToken {
                token: path.clone(),
                project: token_project,
            }));
        }
        if let (Some(ak), Some(sk)) = (ak, sk) {
            let access_key = ak.expose_secret().trim().to_owned();
            if access_key.is_empty() || sk.expose_secret().is_empty() {
                return err("CLOUD_SDK_AK and CLOUD_SDK_SK must not be empty");
            }
            return Ok(AuthSettings::AkSk(AkSkSettings {
                access_key,
                secret_key: sk.clone(),
                security_token: security_token.cloned(),
            }));
        }
        if ak.is_some() || sk.is_some() || security_token.is_some() {
            return err("AK/SK signing needs both CLOUD_SDK_AK and CLOUD_SDK_SK");
        }
        let required = |v: &Option<String>, name: &str| match v.as_deref().map(str::trim) {
            Some(s) if !s.is_empty() => Ok(s.to_owned()),
            _ => Err(ConfigError(format!("IAM authentication needs {name}"))),
        };
        let endpoint = required(&self.iam_endpoint, "IAM_ENDPOINT")?;
        let Some(endpoint) = http_url(&endpoint) else {
            return err("IAM_ENDPOINT must be an http:// or https:// URL");
        };
        let password = match &self.iam_password {
            Some(p) if !p.expose_secret().is_empty() => p.clone(),
            _ => return err("IAM authentication needs IAM_PASSWORD"),
        };
        let home = match (&self.iam_project_name, &self.iam_project_id) {
            (Some(_), Some(_)) => {
                return err("set IAM_PROJECT_NAME or IAM_PROJECT_ID, not both");
            }
            (Some(name), None) => Some(ProjectScope::Name(required(
                &Some(name.clone()),
                "IAM_PROJECT_NAME",
            )?)),
            (None, Some(id)) => Some(ProjectScope::Id(required(
                &Some(id.clone()),
                "IAM_PROJECT_ID",
            )?)),
            (None, None) => None,
        };
        if self.iam_renew_before.is_zero() {
            return err("IAM_RENEW_BEFORE must be above 0");
        }
        Ok(AuthSettings::Iam(IamSettings {
            endpoint,
            user: required(&self.iam_user, "IAM_USER")?,
            password,
            domain: required(&self.iam_domain, "IAM_DOMAIN")?,
            home,
            renew_before: self.iam_renew_before,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(argv: &[&str]) -> Result<AuthSettings, ConfigError> {
        #[derive(clap::Parser)]
        #[command(no_binary_name = true)]
        struct Auth {
            #[command(flatten)]
            args: AuthArgs,
        }
        crate::cli::parse_args_only::<Auth, _, _>(argv.iter().copied())
            .expect("parses")
            .args
            .validate()
    }

    const P1: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn a_static_token_may_declare_its_project() {
        match auth(&["--aom-auth-token", "t", "--aom-auth-token-project-id", P1]) {
            Ok(AuthSettings::Token(t)) => {
                assert_eq!(t.project.as_ref().map(ProjectId::as_str), Some(P1));
            }
            other => panic!("{other:?}"),
        }
        match auth(&["--aom-auth-token", "t"]) {
            Ok(AuthSettings::Token(t)) => assert_eq!(t.project, None),
            other => panic!("{other:?}"),
        }
        let msg = auth(&["--aom-auth-token", "t", "--aom-auth-token-project-id", "p1"])
            .expect_err("not a project id")
            .0;
        assert!(msg.starts_with("AOM_AUTH_TOKEN_PROJECT_ID"), "{msg}");
        let msg = auth(&[
            "--cloud-sdk-ak",
            "ak",
            "--cloud-sdk-sk",
            "sk",
            "--aom-auth-token-project-id",
            P1,
        ])
        .expect_err("no static token to declare")
        .0;
        assert!(msg.contains("AOM_AUTH_TOKEN_PROJECT_ID"), "{msg}");
    }

    #[test]
    fn iam_needs_no_project_and_takes_one_as_home() {
        let base = [
            "--iam-endpoint",
            "https://iam.example.com",
            "--iam-user",
            "u",
            "--iam-password",
            "p",
            "--iam-domain",
            "d",
        ];
        match auth(&base) {
            Ok(AuthSettings::Iam(s)) => assert_eq!(s.home, None),
            other => panic!("{other:?}"),
        }
        let mut with_home = base.to_vec();
        with_home.extend(["--iam-project-id", P1]);
        match auth(&with_home) {
            Ok(AuthSettings::Iam(s)) => {
                assert_eq!(s.home, Some(ProjectScope::Id(P1.to_owned())));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tokens_follow_the_header_value_rule() {
        assert_eq!(token_problem("abc.DEF-123_ ~"), None);
        assert!(token_problem("").is_some());
        assert!(token_problem("a\nb").is_some());
        assert!(token_problem("a\u{7f}").is_some());
        assert!(token_problem(&"x".repeat(MAX_TOKEN + 1)).is_some());
    }
}
