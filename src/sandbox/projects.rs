//! Several projects: which projects a static token covers (`--token-projects`), which
//! projects the fake IAM's user may get a token for (`--iam-user-projects`), and the
//! region (IAM's project name) of each project (`--project-regions`), which
//! `GET /v3/projects/{project_id}` answers.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

/// An error in a `--token-projects`, `--iam-user-projects` or `--project-regions` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProjectsError {
    /// An item lacks its `=`.
    #[error("`{item}` is not of the form {form}")]
    MissingEquals {
        /// The item as written (a token is not repeated).
        item: String,
        /// The form expected.
        form: &'static str,
    },
    /// An empty token, project id or region.
    #[error("empty {what} in `{item}`")]
    Empty {
        /// What is empty.
        what: &'static str,
        /// Where.
        item: String,
    },
    /// A project id or region with a space, `=`, `,` or `;`.
    #[error("`{value}` is not a valid {what}")]
    Invalid {
        /// What it should be.
        what: &'static str,
        /// The value as written.
        value: String,
    },
    /// The same token or project listed twice.
    #[error("{what} listed twice")]
    Duplicate {
        /// What (a token is not repeated).
        what: String,
    },
}

fn check_id(what: &'static str, value: &str) -> Result<(), ProjectsError> {
    if value
        .chars()
        .any(|c| c.is_whitespace() || matches!(c, '=' | ',' | ';' | '/'))
    {
        return Err(ProjectsError::Invalid {
            what,
            value: value.to_owned(),
        });
    }
    Ok(())
}

/// A list of project ids, `PID[,PID...]` (`--iam-user-projects`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProjectList(BTreeSet<String>);

impl ProjectList {
    /// The list of these ids.
    pub fn new<I, S>(ids: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ProjectList(ids.into_iter().map(Into::into).collect())
    }

    /// True when `project_id` is listed.
    pub fn contains(&self, project_id: &str) -> bool {
        self.0.contains(project_id)
    }
}

impl FromStr for ProjectList {
    type Err = ProjectsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut ids = BTreeSet::new();
        for id in s.split(',').map(str::trim) {
            if id.is_empty() {
                return Err(ProjectsError::Empty {
                    what: "project id",
                    item: s.to_owned(),
                });
            }
            check_id("project id", id)?;
            if !ids.insert(id.to_owned()) {
                return Err(ProjectsError::Duplicate {
                    what: format!("project `{id}`"),
                });
            }
        }
        Ok(ProjectList(ids))
    }
}

/// Parses `PID[,PID...]` (clap's value parser for `--iam-user-projects`).
pub fn parse_project_list(s: &str) -> Result<ProjectList, ProjectsError> {
    s.parse()
}

/// Which projects each static token covers: `TOKEN=PID[,PID...][;TOKEN=...]`
/// (`--token-projects`). A token listed here is a valid token for its projects only.
/// Its [`Debug`](fmt::Debug) never shows a token.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TokenProjects(BTreeMap<Box<str>, ProjectList>);

impl TokenProjects {
    /// Each token with the projects it covers.
    pub fn new<I, T, P>(tokens: I) -> Self
    where
        I: IntoIterator<Item = (T, P)>,
        T: Into<String>,
        P: IntoIterator,
        P::Item: Into<String>,
    {
        TokenProjects(
            tokens
                .into_iter()
                .map(|(t, p)| (t.into().into_boxed_str(), ProjectList::new(p)))
                .collect(),
        )
    }

    /// True when no token is listed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The projects `token` covers, when it is listed.
    pub(super) fn get(&self, token: &[u8]) -> Option<&ProjectList> {
        std::str::from_utf8(token).ok().and_then(|t| self.0.get(t))
    }
}

impl fmt::Debug for TokenProjects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.values().map(|p| ("<redacted>", &p.0)))
            .finish()
    }
}

impl FromStr for TokenProjects {
    type Err = ProjectsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut map = BTreeMap::new();
        for item in s.split(';').map(str::trim).filter(|i| !i.is_empty()) {
            let Some((token, projects)) = item.split_once('=') else {
                return Err(ProjectsError::MissingEquals {
                    item: "<a token>".to_owned(),
                    form: "TOKEN=PID[,PID...]",
                });
            };
            let token = token.trim();
            if token.is_empty() {
                return Err(ProjectsError::Empty {
                    what: "token",
                    item: format!("={projects}"),
                });
            }
            let projects: ProjectList = projects.parse()?;
            if map.insert(Box::from(token), projects).is_some() {
                return Err(ProjectsError::Duplicate {
                    what: "a token is".to_owned(),
                });
            }
        }
        Ok(TokenProjects(map))
    }
}

/// Parses `TOKEN=PID[,PID...][;TOKEN=...]`.
pub fn parse_token_projects(s: &str) -> Result<TokenProjects, ProjectsError> {
    s.parse()
}

/// Clap's value parser for `--token-projects`: as [`parse_token_projects`], with an error
/// that does not repeat the value (it holds tokens), as clap's own would.
#[derive(Debug, Clone, Copy)]
pub struct TokenProjectsParser;

impl clap::builder::TypedValueParser for TokenProjectsParser {
    type Value = TokenProjects;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<TokenProjects, clap::Error> {
        let name = arg
            .and_then(clap::Arg::get_long)
            .unwrap_or("token-projects");
        let refuse = |why: String| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value for '--{name}': {why}\n"),
            )
            .with_cmd(cmd)
        };
        value
            .to_str()
            .ok_or_else(|| refuse("not UTF-8".to_owned()))?
            .parse()
            .map_err(|err: ProjectsError| refuse(err.to_string()))
    }
}

/// The region (IAM's project name) of each project: `PID=REGION,...` (`--project-regions`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProjectRegions(BTreeMap<String, String>);

impl ProjectRegions {
    /// The region of a project, when known.
    pub fn region(&self, project_id: &str) -> Option<&str> {
        self.0.get(project_id).map(String::as_str)
    }

    /// The first project (by id) in `region`, when there is one.
    pub fn project_in(&self, region: &str) -> Option<&str> {
        self.0
            .iter()
            .find_map(|(id, r)| (r == region).then_some(id.as_str()))
    }
}

impl FromStr for ProjectRegions {
    type Err = ProjectsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut map = BTreeMap::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let Some((id, region)) = item.split_once('=') else {
                return Err(ProjectsError::MissingEquals {
                    item: item.to_owned(),
                    form: "PID=REGION",
                });
            };
            let (id, region) = (id.trim(), region.trim());
            for (what, value) in [("project id", id), ("region", region)] {
                if value.is_empty() {
                    return Err(ProjectsError::Empty {
                        what,
                        item: item.to_owned(),
                    });
                }
                check_id(what, value)?;
            }
            if map.insert(id.to_owned(), region.to_owned()).is_some() {
                return Err(ProjectsError::Duplicate {
                    what: format!("project `{id}`"),
                });
            }
        }
        Ok(ProjectRegions(map))
    }
}

/// Parses `PID=REGION,...` (clap's value parser for `--project-regions`; empty: none).
pub fn parse_project_regions(s: &str) -> Result<ProjectRegions, ProjectsError> {
    s.parse()
}

/// A stable, made-up 32-hex-digit domain id for a domain (account) name.
pub(super) fn domain_id(domain: &str) -> String {
    let a = super::script::execution_hash("domain", domain, "a");
    let b = super::script::execution_hash("domain", domain, "b");
    format!("{a:016x}{b:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_token_projects() {
        let t = parse_token_projects("tok-a=p1,p2; tok-b = p3 ;").unwrap();
        assert_eq!(
            t,
            TokenProjects::new([("tok-a", vec!["p1", "p2"]), ("tok-b", vec!["p3"])])
        );
        assert!(t.get(b"tok-a").unwrap().contains("p2"));
        assert!(!t.get(b"tok-b").unwrap().contains("p1"));
        assert!(t.get(b"tok-c").is_none());
        assert!(parse_token_projects("").unwrap().is_empty());
        let debug = format!("{t:?}");
        assert!(!debug.contains("tok-"), "{debug}");
        assert!(debug.contains("p3"), "{debug}");
        for bad in [
            "s3cr3t",
            "=p1",
            "s3cr3t=",
            "s3cr3t=p1,,p2",
            "s3cr3t=p 1",
            "s3cr3t=p1;s3cr3t=p2",
        ] {
            let err = parse_token_projects(bad).unwrap_err();
            assert!(!err.to_string().contains("s3cr3t"), "{bad}: {err}");
        }
    }

    #[test]
    fn parses_project_lists_and_regions() {
        let l = parse_project_list("p1, p2").unwrap();
        assert!(l.contains("p1") && l.contains("p2") && !l.contains("p3"));
        assert!(parse_project_list("").is_err());
        assert!(parse_project_list("p1,p1").is_err());
        let r = parse_project_regions("p1=cn-north-4, p2=ap-southeast-1").unwrap();
        assert_eq!(r.region("p2"), Some("ap-southeast-1"));
        assert_eq!(r.region("p3"), None);
        assert_eq!(r.project_in("cn-north-4"), Some("p1"));
        assert_eq!(r.project_in("eu-west-0"), None);
        assert_eq!(
            parse_project_regions("").unwrap(),
            ProjectRegions::default()
        );
        for bad in ["p1", "p1=", "=r", "p1=a,p1=b", "p1=a b"] {
            assert!(parse_project_regions(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn domain_ids_are_stable_hex() {
        let id = domain_id("acme");
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(id, domain_id("acme"));
        assert_ne!(id, domain_id("other"));
    }
}
