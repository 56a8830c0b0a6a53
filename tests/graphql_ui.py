"""The web UI's four GraphQL documents, verbatim from MLflow 3.17.2's bundle.

Extracted from the ``gql`` template literals of ``mlflow/server/js/build/static/js/*.js``;
``tests/unit/test_graphql.py`` checks they are still the documents the installed bundle holds.
The UI sends them through Apollo, which adds ``__typename`` to every nested selection set
(:func:`with_typenames`).
"""

from __future__ import annotations

from graphql import FieldNode, NameNode, SelectionSetNode, parse, print_ast

GET_RUN = """
  query GetRun($data: MlflowGetRunInput!) @component(name: "MLflow.ExperimentRunTracking") {
    mlflowGetRun(input: $data) {
      apiError {
        helpUrl
        code
        message
      }
      run {
        info {
          runName
          status
          runUuid
          experimentId
          artifactUri
          endTime
          lifecycleStage
          startTime
          userId
        }
        experiment {
          experimentId
          name
          tags {
            key
            value
          }
          artifactLocation
          lifecycleStage
          lastUpdateTime
        }
        modelVersions {
          status
          version
          name
          source
        }
        data {
          metrics {
            key
            value
            step
            timestamp
          }
          params {
            key
            value
          }
          tags {
            key
            value
          }
        }
        inputs {
          datasetInputs {
            dataset {
              digest
              name
              profile
              schema
              source
              sourceType
            }
            tags {
              key
              value
            }
          }
          modelInputs {
            modelId
          }
        }
        outputs {
          modelOutputs {
            modelId
            step
          }
        }
      }
    }
  }
"""

SEARCH_RUNS = """
  query SearchRuns($data: MlflowSearchRunsInput!) {
    mlflowSearchRuns(input: $data) {
      apiError {
        helpUrl
        code
        message
      }
      runs {
        info {
          runName
          status
          runUuid
          experimentId
          artifactUri
          endTime
          lifecycleStage
          startTime
          userId
        }
        experiment {
          experimentId
          name
          tags {
            key
            value
          }
          artifactLocation
          lifecycleStage
          lastUpdateTime
        }
        data {
          metrics {
            key
            value
            step
            timestamp
          }
          params {
            key
            value
          }
          tags {
            key
            value
          }
        }
        inputs {
          datasetInputs {
            dataset {
              digest
              name
              profile
              schema
              source
              sourceType
            }
            tags {
              key
              value
            }
          }
          modelInputs {
            modelId
          }
        }
        outputs {
          modelOutputs {
            modelId
            step
          }
        }
        modelVersions {
          version
          name
          creationTimestamp
          status
          source
        }
      }
    }
  }
"""

GET_EXPERIMENT = """
  query MlflowGetExperimentQuery($input: MlflowGetExperimentInput!) @component(name: "MLflow.ExperimentRunTracking") {
    mlflowGetExperiment(input: $input) {
      apiError {
        code
        message
      }
      experiment {
        artifactLocation
        creationTime
        effectiveTraceArchivalRetention
        experimentId
        lastUpdateTime
        lifecycleStage
        name
        tags {
          key
          value
        }
      }
    }
  }
"""

BULK_INTERVAL = """
  query GetMetricHistoryBulkInterval($data: MlflowGetMetricHistoryBulkIntervalInput!)
  @component(name: "MLflow.ExperimentRunTracking") {
    mlflowGetMetricHistoryBulkInterval(input: $data) {
      __typename
      metrics {
        timestamp
        step
        runId
        key
        value
      }
      apiError {
        code
        message
      }
    }
  }
"""

DOCUMENTS = {
    "GetRun": GET_RUN,
    "SearchRuns": SEARCH_RUNS,
    "MlflowGetExperimentQuery": GET_EXPERIMENT,
    "GetMetricHistoryBulkInterval": BULK_INTERVAL,
}


def with_typenames(document: str) -> str:
    """The document as Apollo's cache sends it: ``__typename`` added to every nested selection set."""
    ast = parse(document)
    for definition in ast.definitions:
        for root in definition.selection_set.selections:  # type: ignore[attr-defined]
            _add_typename(root.selection_set)
    return print_ast(ast)


def _add_typename(selection_set: SelectionSetNode | None) -> None:
    if selection_set is None:
        return
    names = {selection.name.value for selection in selection_set.selections if isinstance(selection, FieldNode)}
    if "__typename" not in names:
        selection_set.selections = (*selection_set.selections, FieldNode(name=NameNode(value="__typename")))
    for selection in selection_set.selections:
        if isinstance(selection, FieldNode):
            _add_typename(selection.selection_set)
