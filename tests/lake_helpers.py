"""Delta tables as other engines write them, for the tests."""
from __future__ import annotations

import glob
import json
import os
import time


def with_deletion_vector(path: str, dv: bool) -> None:
    """A second commit as Spark (Databricks) writes `DELETE FROM t WHERE id < 2` with deletion
    vectors on: the file removed and added again, with its vector (or, ``dv=False``, only the
    feature turned on)."""
    f = os.path.basename(glob.glob(path + "/*.parquet")[0])
    meta = [json.loads(ln) for ln in open(path + "/_delta_log/00000000000000000000.json") if "metaData" in ln][0]
    meta["metaData"]["configuration"] = {"delta.enableDeletionVectors": "true"}
    now = int(time.time() * 1000)
    add = {"path": f, "size": os.path.getsize(f"{path}/{f}"), "partitionValues": {}, "modificationTime": now,
           "dataChange": True, "stats": json.dumps({"numRecords": 20}),
           "deletionVector": {"storageType": "i", "pathOrInlineDv": "wi5b=000010000siXQKl0rr91000f55c8Xg0@@D72lkbi5=-{L",
                              "offset": 1, "sizeInBytes": 36, "cardinality": 2}}
    log = [{"protocol": {"minReaderVersion": 3, "minWriterVersion": 7, "readerFeatures": ["deletionVectors"],
                         "writerFeatures": ["deletionVectors"]}}, meta]
    if dv:
        log += [{"remove": {"path": f, "deletionTimestamp": now, "dataChange": True}}, {"add": add}]
    with open(path + "/_delta_log/00000000000000000001.json", "w") as out:
        out.write("\n".join(map(json.dumps, log)) + "\n")
