# graphslim_optimize(<target> MODEL <model.onnx> [RECIPE <recipe.json> | PASSES <text>] [DATA <data.npz>]
#                    [OUTPUT_DIR <dir>] [ARGS <extra graphslim args>...])
#
# Adds a custom command that runs `graphslim optimize` and a target <target> that depends on its
# output, so OUTPUT_DIR/model.onnx is rebuilt only when the model, the recipe or the data change.
# GRAPHSLIM_EXECUTABLE (a cache variable) is the command to run, `graphslim` by default.

set(GRAPHSLIM_EXECUTABLE "graphslim" CACHE STRING "The graphslim command (may include arguments)")

function(graphslim_optimize target)
  cmake_parse_arguments(GS "" "MODEL;RECIPE;PASSES;DATA;OUTPUT_DIR" "ARGS" ${ARGN})
  if(NOT GS_MODEL)
    message(FATAL_ERROR "graphslim_optimize(${target}): MODEL is required")
  endif()
  if(NOT GS_OUTPUT_DIR)
    set(GS_OUTPUT_DIR "${CMAKE_CURRENT_BINARY_DIR}/${target}")
  endif()
  separate_arguments(_exe UNIX_COMMAND "${GRAPHSLIM_EXECUTABLE}")
  set(_cmd ${_exe} optimize "${GS_MODEL}" -o "${GS_OUTPUT_DIR}" --no-latency -q)
  set(_deps "${GS_MODEL}")
  if(GS_RECIPE)
    list(APPEND _cmd --recipe "${GS_RECIPE}")
    list(APPEND _deps "${GS_RECIPE}")
  elseif(GS_PASSES)
    list(APPEND _cmd --passes "${GS_PASSES}")
  endif()
  if(GS_DATA)
    list(APPEND _cmd --data "${GS_DATA}")
    list(APPEND _deps "${GS_DATA}")
  endif()
  list(APPEND _cmd ${GS_ARGS})
  add_custom_command(
    OUTPUT "${GS_OUTPUT_DIR}/model.onnx" "${GS_OUTPUT_DIR}/report.json"
    COMMAND ${_cmd}
    DEPENDS ${_deps}
    COMMENT "graphslim optimize ${GS_MODEL} -> ${GS_OUTPUT_DIR}"
    VERBATIM)
  add_custom_target(${target} ALL DEPENDS "${GS_OUTPUT_DIR}/model.onnx")
endfunction()
