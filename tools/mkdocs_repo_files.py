"""MkDocs hook: the docs pages may link files of the repository outside docs/ (``../bench/results/x.png``).

Such links are right where the Markdown is read in place (GitHub, an editor). For the site, every
file under the folders in ``REPO_FOLDERS`` is added to the build at its repository path, and the
pages' ``../<folder>/`` links are rewritten to point there, so ``mkdocs build --strict`` still fails
on a link whose target does not exist. Markdown files there become pages outside the navigation.
"""
from __future__ import annotations

import os

from mkdocs.structure.files import File, InclusionLevel

REPO_FOLDERS = ("bench/results",)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def on_files(files, config):
    for folder in REPO_FOLDERS:
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            path = os.path.join(ROOT, folder, name)
            if os.path.isfile(path):
                files.append(File(f"{folder}/{name}", ROOT, config["site_dir"], config["use_directory_urls"],
                                  inclusion=InclusionLevel.NOT_IN_NAV))
    return files


def on_page_markdown(markdown, page, config, files):
    depth = page.file.src_uri.count("/")  # pages under docs/sub/ link ../../bench/...
    for folder in REPO_FOLDERS:
        markdown = markdown.replace("](" + "../" * (depth + 1) + folder + "/", "](" + "../" * depth + folder + "/")
    return markdown
